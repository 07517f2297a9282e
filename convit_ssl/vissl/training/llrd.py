"""Layer-wise learning-rate decay (LLRD) for fine-tuning a ConViT in VISSL.

Fine-tuning a pretrained transformer often works better when early layers
move less than late ones (BEiT, Bao et al. 2022; MAE, He et al. 2022): with
depth L, a parameter at layer `k` trains at `lr * decay ** (L + 1 - k)`, where

    k = 0          patch_embed.*, cls_token, pos_embed
    k = i + 1      blocks.i.*
    k = L + 1      norm.* and everything outside the trunk (VISSL's heads)

so the head keeps the configured rate and the patch embedding gets
`decay ** (L + 1)` of it.

Why a task and not an optimizer: VISSL hands the optimizer anonymous
parameter lists (`vissl.optimizers.get_optimizer_param_groups`), so only the
task, which holds the model, knows which block a parameter belongs to.
`LayerDecayTaskMixin.prepare_optimizer` takes VISSL's own groups (the
trunk / head / remaining x regularized / unregularized split, weight decay
and `non_regularized_parameters` untouched), splits each by layer, and gives
every sub-group VISSL's learning-rate scheduler wrapped in a
`ScaledParamScheduler`. ClassyVision's optimizer writes each group's `lr`
from its scheduler before every step / epoch, so the multiplier is part of
the value written and survives any schedule (constant, cosine, composite
warmup, auto LR scaling), any optimizer (sgd, adamw, lars, ...), and resuming
(the split is deterministic, so checkpointed optimizer state lines up).

Configuration (convit_ssl's one training task, `convit_ssl_task`, has the
option beside repeated augmentation and subsets; see `validate_layer_decay`):

    TRAINER:
      TASK_NAME: convit_ssl_task
    OPTIMIZER:
      layer_decay: 0.65        # 0 < decay <= 1; 1.0 trains every layer at the base rate

Unset or null means VISSL's groups unchanged. Another task gains the option by
listing `LayerDecayTaskMixin` first among its bases.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from classy_vision.optim.classy_optimizer import OptionsView
from classy_vision.optim.param_scheduler import ClassyParamScheduler, ConstantParamScheduler, ParamScheduler
from classy_vision.tasks import TASK_REGISTRY
from vissl.optimizers import get_optimizer_param_groups

from convit_ssl.vissl.model.trunk import find_convit

CONFIG_KEY = "layer_decay"  # under config.OPTIMIZER

# Trunk parameters (relative to the ConViT module) that sit below block 0.
_EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed")


class ScaledParamScheduler(ClassyParamScheduler):
    """`scale * base(where)`, updated at the base scheduler's interval."""

    def __init__(self, base: ParamScheduler, scale: float) -> None:
        super().__init__(update_interval=base.update_interval)
        self.base = base
        self.scale = float(scale)

    def __call__(self, where: float) -> float:
        return self.scale * self.base(where)

    def __repr__(self) -> str:
        return f"ScaledParamScheduler({self.scale:.6g} x {self.base!r})"


def check_layer_decay(value: Any) -> float:
    """`value` as a float in (0, 1]; ValueError naming the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"config.OPTIMIZER.{CONFIG_KEY} must be a number in (0, 1], got {value!r}")
    return float(value)


def trunk_layer_id(name: str, depth: int) -> int:
    """Layer of a ConViT parameter named relative to the model (timm's names).

    0 for the patch embedding, class token and position embedding; i + 1 for
    `blocks.i.*`; depth + 1 for the final norm and the model's own classifier.
    Raises ValueError for a name that fits none of these.
    """
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        index = name.split(".", 2)[1]
        if index.isdigit() and int(index) < depth:
            return int(index) + 1
    if name.startswith(("norm.", "head.")):
        return depth + 1
    raise ValueError(
        f"ConViT parameter {name!r} has no layer for layer-wise lr decay "
        f"(expected patch_embed.*, cls_token, pos_embed, blocks.<0..{depth - 1}>.*, norm.*, head.*)"
    )


def layer_ids(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> layer for every parameter of `model`: the trunk's by
    `trunk_layer_id`, everything else (heads) at the top layer, depth + 1."""
    trunk = find_convit(model, "layer-wise lr decay (OPTIMIZER.layer_decay)")
    top = trunk.depth + 1
    ids = {id(p): top for p in model.parameters()}
    for name, param in trunk.named_parameters():
        ids[id(param)] = trunk_layer_id(name, trunk.depth)
    return ids


def layer_decay_param_groups(
    model: nn.Module, param_groups: Sequence[Mapping[str, Any]], layer_decay: float
) -> list[dict[str, Any]]:
    """Split each of VISSL's param groups by layer and scale its lr scheduler.

    Every output group keeps its source group's keys (weight_decay, ...), with
    `lr` a `ScaledParamScheduler` of the source's lr and the extra keys
    `lr_scale` (decay ** (depth + 1 - layer)) and `layer_id`, which ClassyVision
    copies into the torch optimizer's groups. Source groups keep their order;
    sub-groups go by layer; empty groups are dropped.
    """
    layer_decay = check_layer_decay(layer_decay)
    ids = layer_ids(model)
    num_layers = find_convit(model, "layer-wise lr decay (OPTIMIZER.layer_decay)").depth + 1
    out: list[dict[str, Any]] = []
    for group in param_groups:
        by_layer: dict[int, list] = {}
        for param in group["params"]:
            if id(param) not in ids:
                raise ValueError("a parameter in the optimizer's groups is not part of the model")
            by_layer.setdefault(ids[id(param)], []).append(param)
        lr = group["lr"]
        if isinstance(lr, (int, float)):
            lr = ConstantParamScheduler(lr)
        for layer in sorted(by_layer):
            scale = layer_decay ** (num_layers - layer)
            sub = {key: value for key, value in group.items() if key not in ("params", "lr")}
            sub.update(params=by_layer[layer], lr=ScaledParamScheduler(lr, scale), lr_scale=scale, layer_id=layer)
            out.append(sub)
    return out


class _LayerDecayOptionsView(OptionsView):
    """`options_view.lr` is the largest group lr (the configured schedule's
    value, at scale 1), a float as VISSL's TensorBoard hook expects; the
    per-layer rates are in `optimizer.param_groups`."""

    def __getattr__(self, name):
        if name == "lr":
            return max(group["lr"] for group in self.optimizer.param_groups)
        return super().__getattr__(name)


class LayerDecayTaskMixin:
    """For a VISSL task class: build the optimizer's param groups with
    layer-wise lr decay when `config.OPTIMIZER.layer_decay` is set, VISSL's
    groups unchanged when it is not."""

    def prepare_optimizer(self) -> None:
        layer_decay = self.config["OPTIMIZER"].get(CONFIG_KEY)
        if layer_decay is None:
            super().prepare_optimizer()
            return
        groups = get_optimizer_param_groups(
            model=self.base_model,
            model_config=self.config["MODEL"],
            optimizer_config=self.config["OPTIMIZER"],
            optimizer_schedulers=self.optimizer_schedulers,
        )
        groups = layer_decay_param_groups(self.base_model, groups, layer_decay)
        scales = sorted({g["lr_scale"] for g in groups})  # before ClassyVision wraps numbers as schedulers
        self.optimizer.set_param_groups(groups)
        self.optimizer.options_view = _LayerDecayOptionsView(self.optimizer)
        # logging.info, not a module logger: VISSL swaps logging.root for its own in each rank.
        logging.info(
            "layer-wise lr decay %s: %d param groups, lr multipliers %.3g .. %.3g",
            layer_decay,
            len(groups),
            scales[0],
            scales[-1],
        )


def validate_layer_decay(config: Any) -> None:
    """Pre-launch check: `OPTIMIZER.layer_decay` is valid and refused under a
    task that would ignore it."""
    value = config.OPTIMIZER.get(CONFIG_KEY)
    task = TASK_REGISTRY.get(config.TRAINER.TASK_NAME)
    if task is None:
        raise ValueError(
            f"config.TRAINER.TASK_NAME={config.TRAINER.TASK_NAME!r} is not a registered task "
            f"(registered: {', '.join(sorted(TASK_REGISTRY))})"
        )
    if value is None:
        return
    check_layer_decay(value)
    if not (isinstance(task, type) and issubclass(task, LayerDecayTaskMixin)):
        raise ValueError(
            f"config.OPTIMIZER.{CONFIG_KEY}={value} needs config.TRAINER.TASK_NAME=convit_ssl_task "
            f"(got {config.TRAINER.TASK_NAME!r}, which would ignore it)"
        )


__all__ = [
    "CONFIG_KEY",
    "LayerDecayTaskMixin",
    "ScaledParamScheduler",
    "check_layer_decay",
    "layer_decay_param_groups",
    "layer_ids",
    "trunk_layer_id",
    "validate_layer_decay",
]
