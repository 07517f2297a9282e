"""VISSL's own head modules rebuilt from a checkpoint's `heads` entries, so that
conversions are verified against the head VISSL actually ran (not our fold of it)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import torch
from torch import nn


@lru_cache(maxsize=1)
def _model_config() -> Any:
    """VISSL's default MODEL section (vissl/config/defaults.yaml): its heads read
    the HEAD.* defaults from it."""
    from importlib.resources import files

    import yaml
    from vissl.config import AttrDict

    defaults = yaml.safe_load(files("vissl").joinpath("config", "defaults.yaml").read_text())
    return AttrDict(defaults["config"]).MODEL


def build_vissl_head(heads: Mapping[str, torch.Tensor], index: int, bn_eps: float = 1e-5) -> nn.Module:
    """VISSL's `mlp` (one linear layer) or `eval_mlp` (BatchNorm with `bn_eps`,
    then linear) head `index`, loaded strictly, in eval mode and float32."""
    from vissl.models.heads.linear_eval_mlp import LinearEvalMLP
    from vissl.models.heads.mlp import MLP

    prefix = f"{index}."
    state = {k[len(prefix):]: v.float() for k, v in heads.items() if k.startswith(prefix)}
    model_config = _model_config()
    if "channel_bn.weight" in state:
        out_dim, in_dim = state["clf.clf.0.weight"].shape
        head: nn.Module = LinearEvalMLP(model_config, in_channels=in_dim, dims=[in_dim, out_dim])
        head.channel_bn.eps = bn_eps
    else:
        out_dim, in_dim = state["clf.0.weight"].shape
        head = MLP(model_config, dims=[in_dim, out_dim], use_bias="clf.0.bias" in state)
    head.load_state_dict(state, strict=True)
    return head.eval()
