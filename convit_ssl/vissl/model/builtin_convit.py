"""VISSL's own built-in `convit` trunk, built to hold a given checkpoint: the
reference implementation that conversions of `vissl_convit` files are verified against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vissl.models.trunks.convit import ConViT as VisslConViT

from convit_ssl.checkpoints.formats import vissl_model_parts
from convit_ssl.checkpoints.vissl_convit import vissl_convit_model_kwargs
from convit_ssl.vissl.configs import compose

REFERENCE_CONFIG = "convit_ssl/reference/vissl_builtin_convit"


def vissl_convit_overrides(kwargs: dict[str, Any], locality_dim: int) -> list:
    """Hydra overrides that configure VISSL's `convit` trunk like the ConViT `kwargs`."""
    vt, cv = "config.MODEL.TRUNK.VISION_TRANSFORMERS.", "config.MODEL.TRUNK.CONVIT."
    return [
        f"config={REFERENCE_CONFIG}",
        f"{vt}IMAGE_SIZE={kwargs['img_size']}",
        f"{vt}PATCH_SIZE={kwargs['patch_size']}",
        f"{vt}HIDDEN_DIM={kwargs['width']}",
        f"{vt}NUM_HEADS={kwargs['num_heads']}",
        f"{vt}NUM_LAYERS={kwargs['depth']}",
        f"{vt}MLP_DIM={int(kwargs['width'] * kwargs['mlp_ratio'])}",
        f"{vt}QKV_BIAS={kwargs['qkv_bias']}",
        f"{cv}N_GPSA_LAYERS={kwargs['num_gpsa_layers']}",
        f"{cv}LOCALITY_DIM={locality_dim}",
    ]


def build_vissl_convit(checkpoint: Any, kwargs: dict[str, Any] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """VISSL's `convit` trunk loaded strictly with the trunk of `checkpoint`
    (a VISSL checkpoint or a bare trunk state dict of that trunk), in eval mode
    and float32. Returns x (B, C, H, W) -> class-token features (B, width)."""
    trunk_state, _ = vissl_model_parts(checkpoint)
    if kwargs is None:
        kwargs = vissl_convit_model_kwargs(trunk_state)
    locality_dim = trunk_state["blocks.0.attn.pos_proj.weight"].shape[1] // 3
    _, cfg = compose(vissl_convit_overrides(kwargs, locality_dim))
    model: nn.Module = VisslConViT(cfg.MODEL, "convit")
    model.load_state_dict({k: v.float() for k, v in trunk_state.items()}, strict=True)
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x, None)[0]  # VISSL returns (1, B, C) and requires out_feat_keys

    return forward
