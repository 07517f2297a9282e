"""The implementations a conversion is verified against, other than convit_ssl's
own ConViT: timm's ConVit and VisionTransformer holding a state dict, and
VISSL's two linear heads rebuilt in plain PyTorch from their stored keys.

The heads are rebuilt unfolded (BatchNorm, then the linear layer), so they
check `formats.vissl_head_to_linear`'s fold by computing the function another
way; tests/test_convert.py checks them against VISSL's own
`mlp` and `eval_mlp` modules. VISSL's built-in convit trunk has no stand-in:
it needs VISSL (`convit_ssl.vissl.model.builtin_convit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn

from convit_ssl.checkpoints.infer import strict_load
from convit_ssl.checkpoints.vit import class_slot


def _timm(what: str):
    try:
        import timm.models  # noqa: F401  (an optional dependency: imported when needed)
    except ImportError as e:
        raise RuntimeError(f"verifying {what} needs timm installed (pip install timm), or verify=false") from e
    return timm.models


def _classes(state: Mapping[str, Tensor]) -> int:
    return state["head.weight"].shape[0] if "head.weight" in state else 0


def timm_convit(state: Mapping[str, Tensor], kwargs: Mapping[str, Any]) -> nn.Module:
    """timm's ConVit of the shape `kwargs` describes, holding `state` strictly, in eval mode."""
    ConVit = _timm("timm weights").convit.ConVit
    heads = kwargs["num_heads"]
    model = ConVit(
        img_size=kwargs["img_size"],
        patch_size=kwargs["patch_size"],
        in_chans=kwargs["in_chans"],
        num_classes=_classes(state),
        embed_dim=kwargs["width"] // heads,
        depth=kwargs["depth"],
        num_heads=heads,
        mlp_ratio=kwargs["mlp_ratio"],
        qkv_bias=kwargs["qkv_bias"],
        local_up_to_layer=kwargs["num_gpsa_layers"],
        use_pos_embed=kwargs["use_pos_embed"],
        norm_layer=partial(nn.LayerNorm, eps=kwargs["norm_eps"]),
    )
    strict_load(model, state)
    return model.eval()


def timm_vit(state: Mapping[str, Tensor], kwargs: Mapping[str, Any]) -> nn.Module:
    """timm's VisionTransformer (DeiT, DeiT III, ViT) holding `state` strictly, in eval mode."""
    VisionTransformer = _timm("vit weights").vision_transformer.VisionTransformer
    model = VisionTransformer(
        img_size=kwargs["img_size"],
        patch_size=kwargs["patch_size"],
        in_chans=kwargs["in_chans"],
        num_classes=_classes(state),
        global_pool="token",
        embed_dim=kwargs["width"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs["mlp_ratio"],
        qkv_bias=kwargs["qkv_bias"],
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=kwargs["norm_eps"]),
        no_embed_class=not class_slot(state["pos_embed"]),  # DeiT III: no class slot
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,  # DeiT III: layer scale
    )
    strict_load(model, state)
    return model.eval()


def vissl_head(heads: Mapping[str, Tensor], index: int, bn_eps: float = 1e-5) -> nn.Module:
    """VISSL head `index` as stored: `mlp` (clf.0: one linear layer) or `eval_mlp`
    (channel_bn with eps `bn_eps` on the features, then clf.clf.0), in eval mode."""
    prefix = f"{index}."
    state = {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
    if "channel_bn.weight" not in state:
        out_dim, in_dim = state["clf.0.weight"].shape
        head = nn.Sequential()
        head.clf = nn.Sequential(nn.Linear(in_dim, out_dim, bias="clf.0.bias" in state))
    else:
        out_dim, in_dim = state["clf.clf.0.weight"].shape
        head = nn.Sequential()
        head.channel_bn = nn.BatchNorm1d(in_dim, eps=bn_eps)
        head.clf = nn.Sequential()
        head.clf.clf = nn.Sequential(nn.Linear(in_dim, out_dim, bias="clf.clf.0.bias" in state))
    strict_load(head, state)
    return head.eval()
