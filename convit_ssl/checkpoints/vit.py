"""timm's VisionTransformer (DeiT, ViT) <-> convit_ssl's DeiT baselines.

A ViT state dict has ConViT's key names for everything a DeiT baseline
(`num_gpsa_layers=0`) holds; one tensor differs. ViT's position embedding
(1, 1 + N, C) carries a slot for the class token, which is added to it
before the first block; ConViT's (1, N, C) covers the patches only. Both
models then see `cls_token + pos_embed[:, :1]` as their class token, so the
fold is exact:

    ours.cls_token = vit.cls_token + vit.pos_embed[:, :1]
    ours.pos_embed = vit.pos_embed[:, 1:]

and back, with a zero class slot. `ours -> vit -> ours` is bit-exact; `vit ->
ours -> vit` computes the same function with the class slot moved into the
class token. DeiT III's layer scale (`blocks.i.ls1.gamma`, `ls2.gamma`) is
folded into the projection before it (`proj`, `mlp.fc2`). What has no DeiT
counterpart is refused by name: a distillation token, registers, average or
attention pooling, a pre-norm, query/key norms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.models.factory import ARCHITECTURES

StateDict = dict[str, Tensor]

# key (or key pattern) -> what it is, for the error naming it
_UNMAPPABLE: tuple[tuple[str, str], ...] = (
    (
        r"dist_token|head_dist\.",
        "a distilled DeiT (distillation token dist_token and head_dist): "
        "convert the non-distilled deit_*_patch16_224 weights",
    ),
    (r"reg_token", "a ViT with registers (reg_token)"),
    (r"fc_norm\.", "a ViT with average pooling (fc_norm; global_pool='avg'): the DeiT baselines pool the class token"),
    (r"attn_pool\.", "a ViT with attention pooling (attn_pool; global_pool='map')"),
    (r"norm_pre\.", "a ViT with a pre-norm (norm_pre, as CLIP's)"),
    (r"blocks\.\d+\.attn\.(q_norm|k_norm|norm)\.", "a ViT with normalised queries/keys or attention outputs"),
    (r"patch_embed\.norm\.", "a ViT with a normalised patch embedding"),
)


def unmappable(keys) -> list[str]:
    """What in a ViT state dict (its keys) has no counterpart in a DeiT baseline."""
    found = []
    for pattern, what in _UNMAPPABLE:
        if any(re.match(pattern, k) for k in keys):
            found.append(what)
    return found


def class_slot(pos_embed: Tensor) -> bool:
    """Whether a (1, T, C) position embedding has ViT's class slot: T - 1 is a
    square and T is not (a patch grid's own embedding has a square T here)."""
    tokens = pos_embed.shape[1]
    return _is_square(tokens - 1) and not _is_square(tokens)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def vit_to_deit(state_dict: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """A timm VisionTransformer state dict (head included if present) as
    convit_ssl's DeiT keys, and notes on what was done."""
    problems = unmappable(state_dict)
    if problems:
        raise CheckpointError(f"this is {'; '.join(problems)}; it has no convit_ssl counterpart")
    out = dict(state_dict)
    notes = []
    if "pos_embed" in out and class_slot(out["pos_embed"]):
        pos = out.pop("pos_embed")
        cls = out["cls_token"]
        out["cls_token"] = (cls.float() + pos[:, :1].float()).to(cls.dtype)
        out["pos_embed"] = pos[:, 1:].clone()
        notes.append("ViT position embedding: its class slot folded into cls_token")
    folded = 0
    for key in sorted(k for k in out if re.match(r"blocks\.\d+\.ls[12]\.gamma$", k)):
        gamma = out.pop(key).float()
        block, which = key.split(".ls")[0], key.split(".ls")[1][0]
        target = f"{block}.attn.proj" if which == "1" else f"{block}.mlp.fc2"
        for name, shape in ((f"{target}.weight", (-1, 1)), (f"{target}.bias", (-1,))):
            if name in out:
                out[name] = (out[name].float() * gamma.reshape(shape)).to(out[name].dtype)
        folded += 1
    if folded:
        notes.append(f"layer scale of {folded // 2} blocks folded into attn.proj and mlp.fc2")
    return out, notes


def deit_to_vit(state_dict: Mapping[str, Tensor]) -> StateDict:
    """convit_ssl DeiT keys (no GPSA block) as a timm VisionTransformer state dict
    (class token, class slot of the position embedding zero)."""
    gpsa = sorted(k for k in state_dict if k.endswith("attn.gating_param"))
    if gpsa:
        raise CheckpointError(
            f"a ConViT with {len(gpsa)} GPSA blocks has no ViT counterpart (GPSA attention); "
            "only the DeiT baselines (num_gpsa_layers=0) convert to timm's VisionTransformer"
        )
    out = dict(state_dict)
    if "pos_embed" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return out


# timm architecture names of ViTs and DeiTs: the size word gives the heads
# (a ViT's heads are not visible in tensor shapes).
VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16}
DEIT_ARCHS = {
    name: (spec["width"], spec["num_heads"]) for name, spec in ARCHITECTURES.items() if name.startswith("deit_")
}


def heads_from_timm_name(architecture: str) -> int | None:
    """Number of heads of a timm ViT/DeiT architecture name (vit_small_patch16_224,
    deit_base_patch16_384.fb_in1k, ...), or None when the name does not say."""
    match = re.match(r"(?:vit|deit|deit3)_(tiny|small|medium|base|large|huge)_", architecture)
    return VIT_HEADS[match.group(1)] if match else None


def timm_vit_name(width: int, num_heads: int) -> str:
    """A registered timm architecture to name a DeiT baseline by in a hub folder
    (its model_args override every dimension)."""
    for name, (w, h) in DEIT_ARCHS.items():
        if (w, h) == (width, num_heads):
            return f"{name}_patch16_224"
    size = {v: k for k, v in VIT_HEADS.items() if k != "huge"}.get(num_heads, "base")
    return f"vit_{size}_patch16_224"
