#!/usr/bin/env python
"""Time per training iteration of VISSL's engine with the convit_ssl trunk
against a plain PyTorch loop over the same model and batch.

    python tools/benchmark_vissl.py [--arch convit_tiny] [--batch 32] [--size 224] [--iters 12] [--json out.json]

VISSL side: a real supervised run (`standard_train_step`, one process, CPU,
AdamW, the `mlp` head and VISSL's cross-entropy loss) on VISSL's synthetic
data source with ToTensor + Normalize as the only transforms, loading in the
main process (NUM_DATALOADER_WORKERS=0, so data time is counted, not hidden
in a worker). A hook records the time of every `on_step`; the iteration time
is the median interval after --warmup iterations, so it includes reading the
batch, forward, loss, backward, optimizer step, meters and VISSL's hooks.

Plain side: the model VISSL builds from the same config (`build_model`),
torch.optim.AdamW, cross-entropy, one fixed batch: zero_grad, forward,
loss, backward, step. The two are run plain / VISSL / plain and the plain
time is the median over both plain runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from classy_vision.hooks.classy_hook import ClassyHook  # noqa: I001  (after the patches)

import convit_ssl.vissl  # noqa: F401  (patches + registration, before VISSL is imported)
from convit_ssl.models import model_kwargs
from convit_ssl.vissl.configs import compose

BASE_CONFIG = "test/convit_ssl/supervised_micro_synthetic"
NORMALIZE = {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class StepTimes(ClassyHook):
    """Wall-clock time of every training `on_step` (after the optimizer step and VISSL's step hooks)."""

    on_start = on_phase_start = on_phase_end = on_end = ClassyHook._noop

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_step(self, task: Any) -> None:
        if task.train:
            self.times.append(time.perf_counter())


def make_config(args: argparse.Namespace, checkpoint_dir: str) -> Any:
    width = model_kwargs(args.arch)["width"]
    overrides = [
        f"config={BASE_CONFIG}",
        f"config.MODEL.TRUNK.CONVIT_SSL.ARCH={args.arch}",
        f"config.MODEL.TRUNK.CONVIT_SSL.IMAGE_SIZE={args.size}",
        "config.MODEL.TRUNK.CONVIT_SSL.PATCH_SIZE=16",
        "config.MODEL.TRUNK.CONVIT_SSL.WIDTH=null",
        "config.MODEL.TRUNK.CONVIT_SSL.DEPTH=null",
        "config.MODEL.TRUNK.CONVIT_SSL.NUM_GPSA_LAYERS=null",
        "config.MODEL.TRUNK.CONVIT_SSL.DROP_PATH_RATE=0.0",
        f"config.MODEL.HEAD.PARAMS=[[mlp,{{dims:[{width},1000]}}]]",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={args.batch}",
        f"config.DATA.TRAIN.DATA_LIMIT={args.batch * args.iters}",
        f"config.DATA.TRAIN.DEFAULT_GRAY_IMG_SIZE={args.size}",
        "config.LOG_FREQUENCY=1000",
        f"config.CHECKPOINT.DIR={checkpoint_dir}",
        "config.CHECKPOINT.AUTO_RESUME=false",
    ]
    _, config = compose(overrides)
    config.DATA.TRAIN.TRANSFORMS = [{"name": "ToTensor"}, NORMALIZE]
    return config


def time_vissl(config: Any, warmup: int) -> list[float]:
    from vissl.hooks import default_hook_generator
    from vissl.utils.distributed_launcher import launch_distributed

    timer = StepTimes()
    launch_distributed(
        config, node_id=0, engine_name="train", hook_generator=lambda cfg: default_hook_generator(cfg) + [timer]
    )
    intervals = [b - a for a, b in zip(timer.times, timer.times[1:])]
    if len(intervals) <= warmup:
        raise RuntimeError(f"VISSL ran {len(timer.times)} iterations; need more than --warmup + 1 = {warmup + 1}")
    return intervals[warmup:]


def time_plain(config: Any, iters: int, warmup: int, batch: int, size: int) -> list[float]:
    from vissl.models import build_model

    torch.manual_seed(0)
    model = build_model(config.MODEL, config.OPTIMIZER).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x)[0], y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="convit_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=12, help="training iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of each median")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="convit_ssl_bench_") as tmp:
        config = make_config(args, tmp)
        plain = time_plain(config, args.iters, args.warmup, args.batch, args.size)
        vissl = time_vissl(config, args.warmup)
        plain += time_plain(config, args.iters, args.warmup, args.batch, args.size)
    result = {
        "args": vars(args),
        "torch": torch.__version__,
        "plain_s_per_iter": statistics.median(plain),
        "vissl_s_per_iter": statistics.median(vissl),
    }
    result["vissl_overhead"] = result["vissl_s_per_iter"] / result["plain_s_per_iter"] - 1
    print(f"{args.arch}, batch {args.batch}, {args.size} px, {args.threads} threads, torch {torch.__version__}")
    print(f"plain PyTorch loop   {result['plain_s_per_iter'] * 1000:8.1f} ms/iter  (median of {len(plain)})")
    print(f"VISSL train step     {result['vissl_s_per_iter'] * 1000:8.1f} ms/iter  (median of {len(vissl)})")
    verdict = "met" if result["vissl_overhead"] <= 0.10 else "MISSED"
    print(f"VISSL overhead       {100 * result['vissl_overhead']:+8.1f} %        target <= +10 %  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
