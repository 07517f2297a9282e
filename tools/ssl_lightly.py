#!/usr/bin/env python
"""A self-supervised method trained with lightly's loss and heads on the same
terms as its VISSL run (tools/ssl_quality.py), to tell "does not learn at this
scale" from "VISSL's implementation does not learn".

    python tools/ssl_lightly.py --method simclr moco --seeds 0 --out DIR [--override KEY=VALUE ...]

The same as the VISSL run, read from the same composed config
(``pretrain/<method>/<method>_convit_demo_digits_32`` plus the overrides):
the trunk (convit_ssl's VISSL trunk, built after VISSL's own seeding, so the
random init is the same), the data and augmentations (VISSL's dataset and
transforms: every view is made by VISSL's code), batch size, epochs, AdamW
(betas, weight decay, none on norms, biases, position embedding, class token
and gates), the learning-rate schedule (ClassyVision's scheduler built from
the config, per iteration), and the measurement (the kNN monitor's features
and DINO's weighted kNN on the val split, at the same epochs).

Different: lightly's heads, configured as the config's head (widths,
BatchNorm, bias-free prototypes), lightly's loss, and a plain one-process
training loop (no VISSL hooks: the momentum encoders and prototype freezing
are written here as lightly's examples write them). DeepCluster-v2 has no
lightly implementation and is not offered.

Writes ``<out>/results.json``: per run the kNN top-1 at random init, along the
run and at its end, beside the config and overrides.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import convit_ssl.vissl  # noqa: F401  (VISSL's compatibility patches before VISSL is imported)
from convit_ssl.data.digits import train_val_folders
from convit_ssl.files import atomic_write_text
from convit_ssl.vissl.configs import compose, small_scale_config
from convit_ssl.vissl.hooks.knn import record_frequency

METHODS = ("simclr", "moco", "swav", "dino", "barlow_twins")


# ---------------------------------------------------------------- the config's pieces
def _head_block(config: Any, index: int = 0) -> dict[str, Any]:
    return dict(config.MODEL.HEAD.PARAMS[index][1])


def _mlp_head(head: dict[str, Any]) -> nn.Module:
    """lightly's ProjectionHead with the blocks of VISSL's `mlp` head (SimCLR's, MoCo's):
    Linear (+ BatchNorm) + ReLU between layers, a plain last layer."""
    from lightly.models.modules.heads import ProjectionHead

    dims, bn = head["dims"], bool(head.get("use_bn", False))
    blocks: list[Any] = [(a, b, nn.BatchNorm1d(b) if bn else None, nn.ReLU()) for a, b in zip(dims[:-2], dims[1:-1])]
    return ProjectionHead([*blocks, (dims[-2], dims[-1], None, None)])


def _frozen_iterations(config: Any) -> int:
    """Iterations the config freezes the prototypes / last layer (TEMP_FROZEN_PARAMS_ITER_MAP)."""
    return max((int(n) for _, n in config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP), default=0)


def _param_groups(modules: Sequence[nn.Module], config: Any) -> list[dict[str, Any]]:
    """AdamW groups as the recipe's: weight decay on weight matrices only."""
    skip = set(config.OPTIMIZER.get("non_regularized_parameters", []))
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.split(".")[-1] in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": float(config.OPTIMIZER.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Method(nn.Module):
    """The head(s) and loss of one method; `step(trunk, views, iteration)` returns the loss.
    `teacher` (the momentum encoder: {"trunk", "head"}) where the method has one."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher: nn.Module | None = None

    def before_step(self, iteration: int) -> None:
        """Between backward and the optimizer step (cancelling a frozen layer's gradients)."""

    def after_step(self, trunk: nn.Module, iteration: int, total: int) -> None:
        """Momentum updates, prototype normalisation: after the optimizer step."""


class SimCLR(Method):
    def __init__(self, config: Any) -> None:
        from lightly.loss import NTXentLoss

        super().__init__()
        self.head = _mlp_head(_head_block(config))
        self.loss = NTXentLoss(temperature=config.LOSS.simclr_info_nce_loss.temperature)

    def step(self, trunk: nn.Module, views: list[torch.Tensor], iteration: int) -> torch.Tensor:
        return self.loss(self.head(trunk(views[0])), self.head(trunk(views[1])))


class MoCo(Method):
    """MoCo v2 as VISSL runs it: the query from view 0, the key from view 1 through
    the momentum encoder, a queue of keys (lightly's memory bank)."""

    def __init__(self, config: Any, trunk: nn.Module) -> None:
        from lightly.loss import NTXentLoss

        super().__init__()
        head, block = _head_block(config), config.LOSS.moco_loss
        self.head = _mlp_head(head)
        self.teacher = nn.ModuleDict({"trunk": copy.deepcopy(trunk), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.momentum = float(block.momentum)
        self.loss = NTXentLoss(temperature=block.temperature, memory_bank_size=(block.queue_size, head["dims"][-1]))

    def step(self, trunk: nn.Module, views: list[torch.Tensor], iteration: int) -> torch.Tensor:
        query = self.head(trunk(views[0]))
        with torch.no_grad():
            key = self.teacher["head"](self.teacher["trunk"](views[1]))
        return self.loss(query, key)

    def after_step(self, trunk: nn.Module, iteration: int, total: int) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(trunk, self.teacher["trunk"], self.momentum)
        update_momentum(self.head, self.teacher["head"], self.momentum)


class SwAV(Method):
    def __init__(self, config: Any) -> None:
        from lightly.loss import SwaVLoss
        from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        head, block = _head_block(config), config.LOSS.swav_loss
        dims = head["dims"]
        if not head.get("use_bn", False) or len(dims) != 3:
            raise ValueError(f"lightly's SwaVProjectionHead is Linear-BN-ReLU-Linear; the config's head is {head}")
        self.head = SwaVProjectionHead(dims[0], dims[1], dims[2])
        self.prototypes = SwaVPrototypes(dims[2], list(head["num_clusters"]), _frozen_iterations(config))  # a list

        self.prototypes.heads = nn.ModuleList(nn.Linear(dims[2], k, bias=False) for k in head["num_clusters"])
        self.high = int(block.crops_for_assign[-1]) + 1  # the assignment crops are the first (global) ones
        self.loss = SwaVLoss(
            temperature=block.temperature, sinkhorn_iterations=block.num_iters, sinkhorn_epsilon=block.epsilon
        )
        self.prototypes.normalize()

    def step(self, trunk: nn.Module, views: list[torch.Tensor], iteration: int) -> torch.Tensor:
        scores = [self.prototypes(F.normalize(self.head(trunk(v)), dim=1), step=iteration) for v in views]
        heads = len(self.prototypes.heads)
        per_head = [[s[h] for s in scores] for h in range(heads)]
        return sum(self.loss(s[: self.high], s[self.high :]) for s in per_head) / heads

    def after_step(self, trunk: nn.Module, iteration: int, total: int) -> None:
        self.prototypes.normalize()


class DINO(Method):
    def __init__(self, config: Any, trunk: nn.Module) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead

        super().__init__()
        head, block = _head_block(config), config.LOSS.dino_loss
        dims = head["dims"]
        if len(dims) != 4 or not head.get("use_weight_norm_prototypes", False):
            raise ValueError(f"lightly's DINOProjectionHead is 3 layers and a weight-normed last layer; got {head}")

        def projection() -> nn.Module:
            return DINOProjectionHead(
                dims[0],
                dims[1],
                dims[3],
                head["num_clusters"][0],
                batch_norm=bool(head.get("use_bn", False)),
                norm_last_layer=False,
            )

        self.head = projection()
        self.teacher = nn.ModuleDict({"trunk": copy.deepcopy(trunk), "head": projection()})
        self.teacher["head"].load_state_dict(self.head.state_dict())  # (weight norm: no deepcopy)
        self.teacher.requires_grad_(False)
        self.frozen = _frozen_iterations(config)
        self.momentum = float(block.momentum)
        self.teacher_crops = len(block.crops_for_teacher)
        self.temperatures = (
            float(block.teacher_temp_min),
            float(block.teacher_temp_max),
            int(block.teacher_temp_warmup_iters),
        )
        self.loss = DINOLoss(
            output_dim=head["num_clusters"][0],
            teacher_temp=self.temperatures[1],
            student_temp=block.student_temp,
            center_momentum=block.ema_center,
        )

    def step(self, trunk: nn.Module, views: list[torch.Tensor], iteration: int) -> torch.Tensor:
        low, high, warmup = self.temperatures
        teacher_temp = low + (high - low) * min(1.0, iteration / max(1, warmup))
        with torch.no_grad():
            teacher = [self.teacher["head"](self.teacher["trunk"](v)) for v in views[: self.teacher_crops]]
        student = [self.head(trunk(v)) for v in views]
        return self.loss(teacher, student, teacher_temp=teacher_temp)

    def before_step(self, iteration: int) -> None:
        if iteration < self.frozen:
            self.head.last_layer.weight_g.grad = None
            self.head.last_layer.weight_v.grad = None

    def after_step(self, trunk: nn.Module, iteration: int, total: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(iteration, total, self.momentum, 1.0)
        update_momentum(trunk, self.teacher["trunk"], momentum)
        update_momentum(self.head, self.teacher["head"], momentum)


class BarlowTwins(Method):
    def __init__(self, config: Any) -> None:
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules.heads import BarlowTwinsProjectionHead

        super().__init__()
        blocks = [_head_block(config, i) for i in range(len(config.MODEL.HEAD.PARAMS))]
        self.head = BarlowTwinsProjectionHead(blocks[0]["dims"][0], blocks[0]["dims"][1], blocks[-1]["dims"][1])
        if not blocks[-1].get("use_bias", True):  # VISSL's recipe: a bias-free last layer
            last = self.head.layers[-1]
            self.head.layers[-1] = nn.Linear(last.in_features, last.out_features, bias=False)
        self.loss = BarlowTwinsLoss(lambda_param=config.LOSS.barlow_twins_loss.lambda_)

    def step(self, trunk: nn.Module, views: list[torch.Tensor], iteration: int) -> torch.Tensor:
        return self.loss(self.head(trunk(views[0])), self.head(trunk(views[1])))


def build_method(name: str, config: Any, trunk: nn.Module) -> Method:
    builders: dict[str, Callable[[], Method]] = {
        "simclr": lambda: SimCLR(config),
        "moco": lambda: MoCo(config, trunk),
        "swav": lambda: SwAV(config),
        "dino": lambda: DINO(config, trunk),
        "barlow_twins": lambda: BarlowTwins(config),
    }
    if name not in builders:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(builders)}")
    return builders[name]()


# ---------------------------------------------------------------- one run
def build_trunk(config: Any) -> nn.Module:
    """The trunk VISSL's trainer builds for `config` on rank 0: seeded as VISSL seeds, then built."""
    from vissl.utils.misc import set_seeds

    from convit_ssl.vissl.model.trunk import ConViTSSLTrunk

    set_seeds(config, 0)
    return ConViTSSLTrunk(config.MODEL, "convit_ssl")


class ClassToken(nn.Module):
    """The trunk's `lastCLS` feature: the input of every head, as in the VISSL runs."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, ["lastCLS"])[0]


def _views(items: list[dict[str, Any]]) -> list[torch.Tensor]:
    """VISSL dataset items -> one (B, C, H, W) batch per view."""
    return [torch.stack([item["data"][v] for item in items]) for v in range(len(items[0]["data"]))]


def run_one(method: str, seed: int, train: Path, val: Path, overrides: Sequence[str]) -> dict[str, Any]:
    from classy_vision.generic.distributed_util import set_cpu_device
    from classy_vision.optim.param_scheduler import build_param_scheduler
    from vissl.data import build_dataset

    from convit_ssl.evaluation.knn import knn_accuracy
    from convit_ssl.vissl.hooks.knn import LabelledImages, extract_features

    set_cpu_device()
    config = compose(
        [
            f"config={small_scale_config(method)}",
            f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
            f"config.DATA.TRAIN.LABEL_PATHS=[{train}]",
            f"config.SEED_VALUE={seed}",
            *overrides,
        ]
    )[1]
    dataset = build_dataset(config, "TRAIN")
    trunk = build_trunk(config)
    features = ClassToken(trunk)
    model = build_method(method, config, features)
    image_size = (int(config.MODEL.TRUNK.CONVIT_SSL.IMAGE_SIZE),) * 2
    memory = LabelledImages(config, "TRAIN", (str(train),), 10000, image_size)
    queries = LabelledImages(config, "TEST", (str(val),), 5000, image_size)

    def knn(network: nn.Module) -> float:
        bank = extract_features(network, memory, memory.indices, "lastCLS", 256)
        test = extract_features(network, queries, queries.indices, "lastCLS", 256)
        return knn_accuracy(*bank, *test, k=20, temperature=0.07)["top1"]

    batch, epochs = int(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA), int(config.OPTIMIZER.num_epochs)
    per_epoch = len(dataset) // batch
    total = per_epoch * epochs
    optimizer = torch.optim.AdamW(_param_groups([trunk, model], config), lr=0.0, betas=tuple(config.OPTIMIZER.betas))
    schedule = build_param_scheduler(config.OPTIMIZER.param_schedulers.lr)
    frequency = record_frequency(epochs)
    curve = [(0, round(knn(trunk), 2))]
    print(
        f"== {method} / seed {seed}: lightly, {epochs} epochs x {per_epoch} iterations; kNN at init {curve[0][1]}%",
        flush=True,
    )
    order = torch.Generator().manual_seed(seed)
    started, iteration, losses = time.perf_counter(), 0, []
    for epoch in range(epochs):
        trunk.train(), model.train()
        permutation = torch.randperm(len(dataset), generator=order).tolist()
        for start in range(0, per_epoch * batch, batch):
            views = _views([dataset[i] for i in permutation[start : start + batch]])
            for group in optimizer.param_groups:
                group["lr"] = schedule(iteration / total)
            loss = model.step(features, views, iteration)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            model.before_step(iteration)
            optimizer.step()
            iteration += 1
            model.after_step(features, iteration, total)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"{method} / seed {seed}: loss {losses[-1]} at iteration {iteration}")
        if (epoch + 1) % frequency == 0:
            curve.append((epoch + 1, round(knn(trunk), 2)))
            print(
                f"   epoch {epoch + 1}: loss {sum(losses[-per_epoch:]) / per_epoch:.4f}, kNN {curve[-1][1]}%",
                flush=True,
            )
    seconds = time.perf_counter() - started
    result = {
        "method": method,
        "implementation": "lightly",
        "seed": seed,
        "config": small_scale_config(method),
        "overrides": list(overrides),
        "epochs": epochs,
        "iterations": total,
        "seconds": round(seconds, 1),
        "final_loss": round(losses[-1], 4),
        "knn_top1": {"random_init": curve[0][1], "pretrained": curve[-1][1]},
        "knn_curve": curve,
    }
    if model.teacher is not None:
        result["knn_top1"]["teacher"] = round(knn(model.teacher["trunk"].trunk), 2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/ssl_lightly.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", nargs="+", required=True, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides of the config, as tools/ssl_quality.py --override",
    )
    parser.add_argument("--data", default=None, help="train/<class>/*, val/<class>/* (default: the digits)")
    parser.add_argument("--out", required=True, help="output folder (results.json)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        train, val = train_val_folders(args.data, out)
    except ValueError as e:
        parser.error(str(e))
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    results["command"] = " ".join(["tools/ssl_lightly.py", *(argv if argv is not None else sys.argv[1:])])
    for method in args.method:
        for seed in args.seeds:
            run = run_one(method, seed, train, val, args.override)
            results["runs"].append(run)
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
            knn = run["knn_top1"]
            print(
                f"== {method} / seed {seed} (lightly): kNN top-1 {knn['random_init']:.1f}% -> "
                f"{knn['pretrained']:.1f}% ({run['seconds']:.0f} s)",
                flush=True,
            )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
