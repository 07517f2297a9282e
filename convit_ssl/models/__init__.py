"""Pure-PyTorch ConViT models: no VISSL, no checkpoint formats."""

from convit_ssl.models.attention import GPSA, MHSA
from convit_ssl.models.convit import Block, ConViT
from convit_ssl.models.factory import ARCHITECTURES, create_model, list_models, model_kwargs
from convit_ssl.models.pos_embed import resample_pos_embed

__all__ = [
    "ARCHITECTURES",
    "GPSA",
    "MHSA",
    "Block",
    "ConViT",
    "create_model",
    "list_models",
    "model_kwargs",
    "resample_pos_embed",
]
