"""Named architectures and `create_model`.

Widths are total widths (heads x per-head dim), as in the paper's table:
"+" variants use 64 channels per head instead of 48. The DeiT baselines run
through the same code path with no GPSA layers and DeiT's own head counts.
"""

from __future__ import annotations

import inspect
from typing import Any

from convit_ssl.models.convit import ConViT


def _arch(width: int, num_heads: int, num_gpsa_layers: int) -> dict[str, Any]:
    return {"width": width, "num_heads": num_heads, "depth": 12, "num_gpsa_layers": num_gpsa_layers}


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "convit_tiny": _arch(192, 4, 10),
    "convit_tiny_plus": _arch(256, 4, 10),
    "convit_small": _arch(432, 9, 10),
    "convit_small_plus": _arch(576, 9, 10),
    "convit_base": _arch(768, 16, 10),
    "convit_base_plus": _arch(1024, 16, 10),
    "deit_tiny": _arch(192, 3, 0),
    "deit_small": _arch(384, 6, 0),
    "deit_base": _arch(768, 12, 0),
}

MODEL_ARGS = tuple(inspect.signature(ConViT.__init__).parameters)[1:]


def list_models() -> list:
    """Names accepted by `create_model`."""
    return sorted(ARCHITECTURES)


def model_kwargs(arch: str, **overrides: Any) -> dict[str, Any]:
    """The ConViT keyword arguments of `arch` with `overrides` applied.

    Besides ConViT's own arguments, `head_dim` (channels per head) may be given
    instead of `width`; the timm name `embed_dim` is refused because timm
    means it per head while ViTs mean it in total.
    """
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; available: {', '.join(list_models())}")
    if "embed_dim" in overrides:
        raise ValueError(
            "'embed_dim' is ambiguous (timm's ConViT means per head, ViTs mean total): "
            "pass width= (total channels) or head_dim= (channels per head)"
        )
    unknown = sorted(set(overrides) - set(MODEL_ARGS) - {"head_dim"})
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown}; valid: {', '.join(MODEL_ARGS + ('head_dim',))}")
    kwargs = dict(ARCHITECTURES[arch])
    head_dim = overrides.pop("head_dim", None)
    kwargs.update(overrides)
    if head_dim is not None:
        width = head_dim * kwargs["num_heads"]
        if "width" in overrides and overrides["width"] != width:
            raise ValueError(
                f"width {overrides['width']} contradicts head_dim {head_dim} x num_heads {kwargs['num_heads']}"
            )
        kwargs["width"] = width
    return kwargs


def create_model(arch: str, **overrides: Any) -> ConViT:
    """Build the pure-PyTorch model `arch` (see `list_models()`), e.g.
    ``create_model("convit_tiny", img_size=64, num_classes=10, depth=4, num_gpsa_layers=3)``.
    Its state_dict has timm's ConViT keys."""
    return ConViT(**model_kwargs(arch, **overrides))
