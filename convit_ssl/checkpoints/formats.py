"""Checkpoint formats, named explicitly, and their canonical form.

Canonical form (`Weights`): the trunk as timm ConViT keys (no classifier) plus
an optional linear head `{"weight": (classes, width), "bias": (classes,)}`.
Each format has a reader (object loaded from a file -> Weights) and a writer
(Weights -> object to save); readers pop what they map and refuse leftovers.

- ``vissl``: a VISSL checkpoint of the `convit_ssl` trunk
  (``classy_state_dict.base_model.model.{trunk,heads}``; trunk keys may carry
  feature-eval's ``base_model.`` prefix), or a bare trunk state dict.
- ``timm``: timm's ConViT state dict, also wrapped as the official release's
  ``{"model": ...}`` or a training script's ``{"state_dict": ...}``.
- ``vissl_convit``: a checkpoint of VISSL's built-in ``convit`` trunk (other
  key names, LOCALITY_DIM-repeated positional weights; see vissl_convit.py).

Heads: VISSL's ``mlp`` head with one linear layer is timm's ``head``.
``eval_mlp`` (BatchNorm then linear, from linear evaluation) is folded into
one linear layer, exactly for the BatchNorm's running statistics (eval mode).
Other heads (several layers, BatchNorm1d, ...) have no timm counterpart: they
are an error unless the head is dropped on purpose (``keep_head=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from convit_ssl.checkpoints.io import CheckpointError

FORMATS = ("vissl", "timm", "vissl_convit")
StateDict = Dict[str, Tensor]

_TRUNK_MARKERS = {"cls_token", "patch_embed.proj.weight"}  # our trunk = timm's keys
_VISSL_CONVIT_MARKERS = {"class_token", "patch_embed.proj.weight"}
_EVAL_MLP_BN = ("channel_bn.weight", "channel_bn.bias", "channel_bn.running_mean", "channel_bn.running_var")


@dataclass
class Weights:
    """A ConViT in canonical form."""

    trunk: StateDict
    head: Optional[StateDict] = None
    notes: List[str] = field(default_factory=list)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from every key if all keys carry it; mixed use is an error."""
    having = [k for k in state_dict if k.startswith(prefix)]
    if not having:
        return dict(state_dict)
    if len(having) != len(state_dict):
        others = sorted(k for k in state_dict if not k.startswith(prefix))[:5]
        raise CheckpointError(f"some trunk keys start with {prefix!r} and some do not (e.g. {others})")
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def vissl_model_parts(obj: Any) -> tuple:
    """(trunk, heads) of a VISSL checkpoint, its `classy_state_dict`, or a bare trunk."""
    if _is_state_dict(obj):
        return dict(obj), {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict checkpoint, found {type(obj).__name__}")
    node = obj
    for key in ("classy_state_dict", "base_model", "model"):
        if key in node:
            node = node[key]
        elif key != "classy_state_dict":
            raise CheckpointError(
                f"not a VISSL checkpoint: expected classy_state_dict.base_model.model.{{trunk,heads}}, "
                f"missing {key!r}; top-level keys: {sorted(map(str, obj))[:10]}"
            )
    if not isinstance(node, Mapping) or "trunk" not in node:
        raise CheckpointError(f"VISSL checkpoint without a trunk state dict; found keys {sorted(map(str, node))[:10]}")
    trunk = _strip_prefix(node["trunk"], "base_model.")
    return trunk, dict(node.get("heads", {}))


def detect_format(obj: Any) -> str:
    """Name the format of a loaded checkpoint (one of FORMATS), from its structure."""
    if _is_state_dict(obj):
        keys = set(obj)
        if _TRUNK_MARKERS <= keys or _TRUNK_MARKERS <= {k.removeprefix("module.") for k in keys}:
            return "timm"
        if _VISSL_CONVIT_MARKERS <= keys:
            return "vissl_convit"
        raise CheckpointError(f"unrecognised state dict (keys such as {sorted(keys)[:6]}): not a ConViT checkpoint")
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and _is_state_dict(obj[wrapper]) and "classy_state_dict" not in obj:
                return detect_format(obj[wrapper])
        if "classy_state_dict" in obj:
            trunk, _ = vissl_model_parts(obj)
            if _TRUNK_MARKERS <= set(trunk):
                return "vissl"
            if _VISSL_CONVIT_MARKERS <= set(trunk):
                return "vissl_convit"
            raise CheckpointError(f"VISSL checkpoint of another trunk (keys such as {sorted(trunk)[:6]})")
    raise CheckpointError(f"not a checkpoint this tool reads: {type(obj).__name__} with keys "
                          f"{sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else '-'}")


def vissl_head_to_linear(heads: Mapping[str, Tensor], index: int = 0, bn_eps: float = 1e-5) -> tuple:
    """timm-style {"weight", "bias"} of VISSL head `index`, and a note on what was done."""
    prefix = f"{index}."
    entries = {k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)}
    if not entries:
        present = sorted({k.split(".", 1)[0] for k in heads})
        raise CheckpointError(f"the checkpoint has no head {index}; heads present: {present or 'none'}")
    bn = {k: entries.pop(k) for k in _EVAL_MLP_BN if k in entries}
    entries.pop("channel_bn.num_batches_tracked", None)
    # mlp: clf = Sequential(Linear); eval_mlp: channel_bn + clf = MLP whose clf = Sequential(Linear)
    linear = "clf.clf.0." if bn else "clf.0."
    weight, bias = entries.pop(linear + "weight", None), entries.pop(linear + "bias", None)
    if weight is None or entries or (bn and len(bn) != len(_EVAL_MLP_BN)):
        layers = sorted(set(entries) | ({linear + "weight"} if weight is None else set()))
        raise CheckpointError(
            f"head {index} is not a single linear layer (mlp with dims [width, classes]) or an eval_mlp "
            f"(BatchNorm + linear): unexpected or missing {layers}. timm's head is one linear layer; "
            "convert with keep_head=false to drop this head"
        )
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if not bn:
        return {"weight": weight, "bias": bias}, f"VISSL mlp head {index} -> timm head"
    # eval_mlp: y = W ((x - mean) / sqrt(var + eps) * gamma + beta) + b, folded into one linear layer.
    scale = bn["channel_bn.weight"].double() / (bn["channel_bn.running_var"].double() + bn_eps).sqrt()
    shift = bn["channel_bn.bias"].double() - bn["channel_bn.running_mean"].double() * scale
    w = weight.double()
    folded_w = (w * scale[None, :]).to(weight.dtype)
    folded_b = (bias.double() + w @ shift).to(bias.dtype)
    return {"weight": folded_w, "bias": folded_b}, (
        f"VISSL eval_mlp head {index}: BatchNorm (running statistics, eps {bn_eps}) folded into the linear layer"
    )


def read(obj: Any, fmt: str, keep_head: bool = True, head_index: int = 0, bn_eps: float = 1e-5) -> Weights:
    """Read a loaded checkpoint of format `fmt` into canonical Weights."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    notes: List[str] = []
    head: Optional[StateDict] = None
    if fmt == "timm":
        if not _is_state_dict(obj):
            for wrapper in ("model", "state_dict"):
                if isinstance(obj, Mapping) and _is_state_dict(obj.get(wrapper)):
                    obj = obj[wrapper]
                    notes.append(f"read timm weights from the {wrapper!r} entry")
                    break
            else:
                raise CheckpointError("not a timm checkpoint: expected a state dict or {'model': state dict}")
        trunk = _strip_prefix(obj, "module.")
        head_keys = {"head.weight", "head.bias"} & set(trunk)
        if head_keys:
            found = {k.split(".", 1)[1]: trunk.pop(k) for k in sorted(head_keys)}
            head = found if keep_head else None
            if not keep_head:
                notes.append("dropped the classifier head (keep_head=false)")
    else:
        trunk, heads = vissl_model_parts(obj)
        if fmt == "vissl_convit":
            from convit_ssl.checkpoints.vissl_convit import vissl_convit_to_timm

            trunk = vissl_convit_to_timm(trunk)
            notes.append("VISSL built-in convit keys mapped to timm's (positional weights summed over LOCALITY_DIM)")
        if heads and keep_head:
            head, note = vissl_head_to_linear(heads, head_index, bn_eps)
            notes.append(note)
        elif heads:
            notes.append(f"dropped {len({k.split('.', 1)[0] for k in heads})} VISSL head(s) (keep_head=false)")
    if not _TRUNK_MARKERS <= set(trunk):
        raise CheckpointError(f"the {fmt} checkpoint holds no ConViT trunk (keys such as {sorted(trunk)[:6]})")
    return Weights(trunk=trunk, head=head, notes=notes)


def write(weights: Weights, fmt: str) -> Dict[str, Any]:
    """The object to save for format `fmt` (vissl or timm)."""
    if fmt == "timm":
        out = dict(weights.trunk)
        if weights.head is not None:
            out.update({f"head.{k}": v for k, v in weights.head.items()})
        return out
    if fmt == "vissl":
        heads = {} if weights.head is None else {f"0.clf.0.{k}": v for k, v in weights.head.items()}
        return {"classy_state_dict": {"base_model": {"model": {"trunk": dict(weights.trunk), "heads": heads}}}}
    if fmt == "vissl_convit":
        from convit_ssl.checkpoints.vissl_convit import timm_to_vissl_convit

        heads = {} if weights.head is None else {f"0.clf.0.{k}": v for k, v in weights.head.items()}
        return {"classy_state_dict": {"base_model": {"model": {"trunk": timm_to_vissl_convit(weights.trunk),
                                                               "heads": heads}}}}
    raise CheckpointError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
