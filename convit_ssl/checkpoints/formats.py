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
- ``vit``: timm's VisionTransformer (DeiT, ViT), the DeiT baselines' other
  layout: its position embedding has a class slot (see vit.py).

VISSL checkpoints of DINO and MoCo runs also hold the momentum teacher
(``classy_state_dict.loss.momentum_teacher.*`` / ``loss.moco_encoder.*``);
``network="teacher"`` reads it instead of the student.

Heads: VISSL's ``mlp`` head with one linear layer is timm's ``head``.
``eval_mlp`` (BatchNorm then linear, from linear evaluation) is folded into
one linear layer, exactly for the BatchNorm's running statistics (eval mode).
Other heads (several layers, BatchNorm1d, ...) have no timm counterpart: they
are an error unless the head is dropped on purpose (``keep_head=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.checkpoints.vissl_convit import timm_to_vissl_convit, vissl_convit_to_timm
from convit_ssl.checkpoints.vit import class_slot, deit_to_vit, unmappable, vit_to_deit

FORMATS = ("vissl", "timm", "vissl_convit", "vit")
NETWORKS = ("student", "teacher")
# where VISSL keeps a momentum teacher in classy_state_dict.loss (DINO's, MoCo's)
TEACHERS = {"momentum_teacher": "DINO", "moco_encoder": "MoCo"}
StateDict = dict[str, Tensor]

_TRUNK_MARKERS = {"cls_token", "patch_embed.proj.weight"}  # our trunk = timm's keys
_VISSL_CONVIT_MARKERS = {"class_token", "patch_embed.proj.weight"}
_EVAL_MLP_BN = ("channel_bn.weight", "channel_bn.bias", "channel_bn.running_mean", "channel_bn.running_var")


@dataclass
class Weights:
    """A ConViT in canonical form."""

    trunk: StateDict
    head: StateDict | None = None
    notes: list[str] = field(default_factory=list)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from every key if all keys carry it; mixed use is an error."""
    having = [k for k in state_dict if k.startswith(prefix)]
    if not having:
        return dict(state_dict)
    if len(having) != len(state_dict):
        others = sorted(k for k in state_dict if not k.startswith(prefix))[:5]
        raise CheckpointError(f"some trunk keys start with {prefix!r} and some do not (e.g. {others})")
    return {k[len(prefix) :]: v for k, v in state_dict.items()}


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


def select_network(obj: Any, network: str) -> Any:
    """`obj` itself for the student; for `network="teacher"`, a VISSL checkpoint
    whose model is the momentum teacher of a DINO or MoCo run (kept by VISSL in
    classy_state_dict.loss.momentum_teacher.* / loss.moco_encoder.*)."""
    if network not in NETWORKS:
        raise CheckpointError(f"network {network!r} is not one of {', '.join(NETWORKS)}")
    if network == "student":
        return obj
    classy = obj.get("classy_state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(classy, Mapping):
        raise CheckpointError("network=teacher needs a VISSL checkpoint (classy_state_dict) of a DINO or MoCo run")
    loss = classy.get("loss") if isinstance(classy.get("loss"), Mapping) else {}
    for name in TEACHERS:
        for prefix in (f"{name}.module.", f"{name}."):
            parts = {
                part: {k[len(prefix) + len(part) + 1 :]: v for k, v in loss.items() if k.startswith(f"{prefix}{part}.")}
                for part in ("trunk", "heads")
            }
            if parts["trunk"]:
                return {"classy_state_dict": {"base_model": {"model": parts}}}
    found = sorted({k.split(".", 1)[0] for k in loss}) or "nothing"
    raise CheckpointError(
        "network=teacher: the checkpoint has no momentum teacher (DINO runs keep it in "
        f"classy_state_dict.loss.momentum_teacher, MoCo runs in loss.moco_encoder); its loss state holds {found}. "
        "Use network=student"
    )


def _is_vit(keys, state_dict: Mapping[str, Tensor]) -> bool:
    pos = state_dict.get("pos_embed")
    return (
        bool(unmappable(keys))
        or any(".ls1.gamma" in k for k in keys)
        or (pos is not None and pos.ndim == 3 and class_slot(pos) and not any(k.endswith("gating_param") for k in keys))
    )


# Checkpoints of other models, named by keys they alone have.
_FOREIGN = (
    ("relative_position_bias_table", "a Swin Transformer (relative_position_bias_table)"),
    ("_feature_blocks.", "a VISSL ResNet / ResNeXt / RegNet trunk (_feature_blocks)"),
    ("layer1.0.conv1.weight", "a ResNet (conv1, layer1..layer4, fc)"),
    ("stages.0.", "a ConvNeXt or another staged CNN (stages.*)"),
)


def _foreign(keys) -> str | None:
    """The model a state dict that is not a ConViT or a ViT holds, when its keys name one."""
    for marker, what in _FOREIGN:
        if any(marker in k for k in keys):
            return what
    return None


def describe(keys) -> str:
    """What a state dict that is not a ConViT holds, for an error message."""
    if {"class_token", "pos_embedding"} <= set(keys):  # and not VISSL's convit (_is_vissl_convit)
        return "VISSL's vision_transformer trunk (class_token, pos_embedding with a class slot)"
    return _foreign(keys) or f"an unknown model (keys such as {sorted(keys)[:6]})"


_WHAT_WE_READ = (
    "convit_ssl converts ConViT checkpoints (timm, the official release, VISSL, VISSL's built-in convit) "
    "and DeiT / ViT ones (timm's VisionTransformer) only"
)


def detect_format(obj: Any) -> str:
    """Name the format of a loaded checkpoint (one of FORMATS), from its structure."""
    state, _ = unwrap_state_dict(obj)
    if state is not None:
        stripped = {k.removeprefix("module."): v for k, v in state.items()}
        keys = set(stripped)
        if foreign := _foreign(keys):
            raise CheckpointError(f"not a ConViT checkpoint: this is {foreign}. {_WHAT_WE_READ}")
        if _is_vit(keys, stripped):
            return "vit"
        if _TRUNK_MARKERS <= keys:
            return "timm"
        if _VISSL_CONVIT_MARKERS <= keys and _is_vissl_convit(stripped):
            return "vissl_convit"
        raise CheckpointError(f"not a ConViT checkpoint: this is {describe(keys)}. {_WHAT_WE_READ}")
    if isinstance(obj, Mapping) and "classy_state_dict" in obj:
        trunk, _ = vissl_model_parts(obj)
        if _TRUNK_MARKERS <= set(trunk):
            return "vissl"
        if _VISSL_CONVIT_MARKERS <= set(trunk) and _is_vissl_convit(trunk):
            return "vissl_convit"
        raise CheckpointError(f"a VISSL checkpoint of another trunk: {describe(trunk)}. {_WHAT_WE_READ}")
    raise CheckpointError(
        f"not a checkpoint this tool reads: {type(obj).__name__} with keys "
        f"{sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else '-'}"
    )


def unwrap_state_dict(obj: Any) -> tuple[StateDict | None, str | None]:
    """(state dict, the entry it was in or None) of a timm-style checkpoint: a
    state dict, or one under "model" (the official release, its training
    script) or "state_dict"; (None, None) for anything else (VISSL checkpoints)."""
    if _is_state_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping) and "classy_state_dict" not in obj:
        for wrapper in ("model", "state_dict"):
            if _is_state_dict(obj.get(wrapper)):
                return dict(obj[wrapper]), wrapper
    return None, None


def _is_vissl_convit(trunk: Mapping[str, Tensor]) -> bool:
    """VISSL's convit and vision_transformer trunks share key names; the ViT's
    pos_embedding has a class slot."""
    pos = trunk.get("pos_embedding")
    return pos is None or pos.ndim != 3 or not class_slot(pos)


def vissl_head_to_linear(heads: Mapping[str, Tensor], index: int = 0, bn_eps: float = 1e-5) -> tuple:
    """timm-style {"weight", "bias"} of VISSL head `index`, and a note on what was done."""
    prefix = f"{index}."
    entries = {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
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


def read(
    obj: Any, fmt: str, keep_head: bool = True, head_index: int = 0, bn_eps: float = 1e-5, network: str = "student"
) -> Weights:
    """Read a loaded checkpoint of format `fmt` into canonical Weights (`network`:
    the student, or a DINO / MoCo run's momentum teacher, for VISSL formats)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if network not in NETWORKS:
        raise CheckpointError(f"network {network!r} is not one of {', '.join(NETWORKS)}")
    notes: list[str] = []
    head: StateDict | None = None
    if fmt in ("timm", "vit"):
        if network != "student":
            raise CheckpointError(
                f"network={network} applies to VISSL checkpoints of DINO and MoCo runs, not to a {fmt} file"
            )
        state, wrapper = unwrap_state_dict(obj)
        if state is None:
            raise CheckpointError(f"not a {fmt} checkpoint: expected a state dict or {{'model': state dict}}")
        if wrapper is not None:
            notes.append(f"read {fmt} weights from the {wrapper!r} entry")
        trunk = _strip_prefix(state, "module.")
        if fmt == "vit":
            trunk, vit_notes = vit_to_deit(trunk)
            notes += vit_notes
        head_keys = {"head.weight", "head.bias"} & set(trunk)
        if head_keys:
            found = {k.split(".", 1)[1]: trunk.pop(k) for k in sorted(head_keys)}
            head = found if keep_head else None
            if not keep_head:
                notes.append("dropped the classifier head (keep_head=false)")
    else:
        trunk, heads = vissl_model_parts(select_network(obj, network))
        if network == "teacher":
            notes.append("read the momentum teacher (network=teacher)")
        if fmt == "vissl_convit":
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


def write(weights: Weights, fmt: str) -> dict[str, Any]:
    """The object to save for format `fmt`."""
    if fmt in ("timm", "vit"):
        if fmt == "vit":
            out = deit_to_vit(weights.trunk)
        else:
            out = dict(weights.trunk)
        if weights.head is not None:
            out.update({f"head.{k}": v for k, v in weights.head.items()})
        return out
    if fmt == "vissl":
        heads = {} if weights.head is None else {f"0.clf.0.{k}": v for k, v in weights.head.items()}
        return {"classy_state_dict": {"base_model": {"model": {"trunk": dict(weights.trunk), "heads": heads}}}}
    if fmt == "vissl_convit":
        heads = {} if weights.head is None else {f"0.clf.0.{k}": v for k, v in weights.head.items()}
        return {
            "classy_state_dict": {
                "base_model": {"model": {"trunk": timm_to_vissl_convit(weights.trunk), "heads": heads}}
            }
        }
    raise CheckpointError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
