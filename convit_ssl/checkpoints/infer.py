"""The model a canonical (timm-keyed) trunk state dict describes, from tensor shapes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.models import ARCHITECTURES, ConViT, list_models
from convit_ssl.models.geometry import square_grid


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with int(width * ratio) == hidden (the model builds its MLP that way)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # floating-point floor just below an integer
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != hidden:
        raise CheckpointError(f"no mlp_ratio gives an MLP width of {hidden} for width {width}")
    return ratio


def infer_model_kwargs(
    trunk: Mapping[str, Tensor], arch: str | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """`ConViT` keyword arguments (num_classes=0) of a model whose state dict is `trunk`.

    From shapes: width (C of patch_embed.proj.weight (C, in, p, p)), in_chans,
    patch_size, depth, num_gpsa_layers (leading blocks with a gate), mlp_ratio,
    qkv_bias, use_pos_embed and img_size (p * sqrt(N) for pos_embed (1, N, C):
    a square grid is assumed). The head count is the size of a GPSA gate; a
    checkpoint without GPSA blocks needs `num_heads` or `arch`. With `arch`, its
    width and heads are checked against the shapes (depth and GPSA count come
    from the checkpoint, so tiny twins of an architecture are accepted).
    """
    try:
        proj = trunk["patch_embed.proj.weight"]
        trunk["cls_token"]
    except KeyError as e:
        raise CheckpointError(f"not a ConViT trunk: missing {e.args[0]!r}") from e
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected (width, in_chans, p, p)"
        )
    width, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    depth = len({int(m.group(1)) for k in trunk if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0 or any(f"blocks.{i}.norm1.weight" not in trunk for i in range(depth)):
        raise CheckpointError(f"block indices of the checkpoint are not 0..{depth - 1}")
    kinds = [f"blocks.{i}.attn.gating_param" in trunk for i in range(depth)]
    num_gpsa = sum(kinds)
    if any(kinds[num_gpsa:]):
        raise CheckpointError(f"GPSA blocks must precede the MHSA blocks; block kinds (True = GPSA): {kinds}")
    if num_gpsa == depth:
        raise CheckpointError(f"all {depth} blocks are GPSA: the class token would never join")
    heads = {int(trunk[f"blocks.{i}.attn.gating_param"].shape[0]) for i in range(num_gpsa)}
    if len(heads) > 1:
        raise CheckpointError(f"GPSA blocks disagree on the number of heads: {sorted(heads)}")
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {arch!r}; available: {', '.join(list_models())}")
        expected = ARCHITECTURES[arch]
        found = {"width": width, "num_heads": next(iter(heads), expected["num_heads"])}
        clash = [f"{k} {found[k]} (checkpoint) vs {expected[k]} ({arch})" for k in found if found[k] != expected[k]]
        if clash:
            raise CheckpointError(f"the checkpoint is not a {arch}: {', '.join(clash)}")
        num_heads = num_heads or expected["num_heads"]
    if heads:
        inferred = heads.pop()
        if num_heads is not None and num_heads != inferred:
            raise CheckpointError(f"num_heads={num_heads} contradicts the {inferred} heads of the GPSA blocks")
        num_heads = inferred
    elif num_heads is None:
        raise CheckpointError(
            "the checkpoint has no GPSA block, so its number of heads is not visible in tensor shapes; "
            f"give arch (one of {', '.join(list_models())}) or num_heads"
        )
    if width % num_heads:
        raise CheckpointError(f"width {width} is not divisible by {num_heads} heads")
    hidden = [int(trunk[f"blocks.{i}.mlp.fc1.weight"].shape[0]) for i in range(depth)]
    common = max(set(hidden), key=hidden.count)
    odd = [f"blocks.{i}.mlp.fc1.weight ({h} rows)" for i, h in enumerate(hidden) if h != common]
    if odd:
        raise CheckpointError(f"blocks disagree on the MLP width: {', '.join(odd)}; the other blocks have {common}")
    biases = {(f"blocks.{i}.attn.qk.bias" if kinds[i] else f"blocks.{i}.attn.qkv.bias") in trunk for i in range(depth)}
    if len(biases) > 1:
        raise CheckpointError("blocks disagree on qkv biases (some have qk.bias/qkv.bias, some not)")
    kwargs: dict[str, Any] = {
        "patch_size": patch_size,
        "in_chans": in_chans,
        "num_classes": 0,
        "width": width,
        "depth": depth,
        "num_heads": num_heads,
        "num_gpsa_layers": num_gpsa,
        "mlp_ratio": _mlp_ratio(width, common),
        "qkv_bias": biases.pop(),
        "use_pos_embed": "pos_embed" in trunk,
    }
    if "pos_embed" in trunk:
        try:
            side, _ = square_grid(int(trunk["pos_embed"].shape[1]), "pos_embed")
        except ValueError as e:
            raise CheckpointError(f"{e}; cannot infer img_size") from None
        kwargs["img_size"] = side * patch_size
    else:
        raise CheckpointError("the checkpoint has no position embedding: its image size is not recorded")
    return kwargs


def check_trunk(trunk: Mapping[str, Tensor], kwargs: Mapping[str, Any]) -> None:
    """The trunk has exactly the keys and shapes of `ConViT(**kwargs)`, or a
    CheckpointError lists the missing, unexpected and mis-shaped keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ConViT(**{**kwargs, "num_classes": 0}).state_dict().items()}
    missing = sorted(set(expected) - set(trunk))
    unexpected = sorted(set(trunk) - set(expected))
    shapes = sorted(
        f"{k} {tuple(trunk[k].shape)} (expected {expected[k]})"
        for k in set(expected) & set(trunk)
        if tuple(trunk[k].shape) != expected[k]
    )
    problems = [
        f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise CheckpointError("the trunk does not match the ConViT its shapes describe: " + "; ".join(problems))


def strict_load(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load `state`, cast to float32, into `model` strictly; a mismatch is a
    CheckpointError naming the model and the keys."""
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"strict load into {type(model).__name__} failed: {e}") from e


def build_convit(
    trunk: Mapping[str, Tensor], kwargs: Mapping[str, Any], head: Mapping[str, Tensor] | None = None
) -> ConViT:
    """Our ConViT in eval mode holding `trunk` (and the linear `head`, else no
    classifier), built from `kwargs` (as `infer_model_kwargs` returns) and loaded strictly."""
    num_classes = 0 if head is None else head["weight"].shape[0]
    model = ConViT(**{**kwargs, "num_classes": num_classes})
    state = dict(trunk)
    if head is not None:
        state.update({f"head.{k}": v for k, v in head.items()})
    strict_load(model, state)
    return model.eval()
