#!/usr/bin/env python
"""Throughput and memory of convit_ssl's ConViT against timm's ConViT and a timm
ViT of identical dimensions, measured in one process, in alternation.

    python tools/benchmark.py [--arch convit_tiny] [--batch 32] [--size 224] [--threads 2] [--json out.json]

Rows (CPU fp32 by default): forward images/s (inference), training-step images/s
(forward, backward, AdamW step), and the peak memory of one training step at
--mem-size px (measured in fresh subprocesses, minus a process that only builds
the model). Ratios are against the peers measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import convit_ssl  # noqa: F401  (compat shims before timm)
import torch

PEERS = ("ours", "timm_convit", "timm_vit")


def build(kind: str, arch: str, size: int) -> torch.nn.Module:
    """`ours` (convit_ssl), `timm_convit` (timm's ConVit), `timm_vit` (timm ViT, same dims)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = convit_ssl.models.ARCHITECTURES[arch]
    if kind == "ours":
        return convit_ssl.create_model(arch, img_size=size)
    if kind == "timm_convit":
        return timm.create_model(arch, img_size=size) if arch in ("convit_tiny", "convit_small", "convit_base") else \
            timm.models.convit.ConVit(img_size=size, embed_dim=spec["width"] // spec["num_heads"],
                                      num_heads=spec["num_heads"], local_up_to_layer=spec["num_gpsa_layers"])
    return VisionTransformer(img_size=size, embed_dim=spec["width"], depth=spec["depth"], num_heads=spec["num_heads"],
                             qkv_bias=False)


def _time(fn: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def measure_speed(arch: str, batch: int, size: int, rounds: int, iters: int) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    models = {k: build(k, arch, size) for k in PEERS}
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def forward(k):
        def run():
            with torch.inference_mode():
                models[k].eval()(x)
        return run

    def train(k):
        def run():
            m = models[k].train()
            loss = torch.nn.functional.cross_entropy(m(x), target)
            optims[k].zero_grad(set_to_none=True)
            loss.backward()
            optims[k].step()
        return run

    results: Dict[str, Dict[str, list]] = {k: {"forward": [], "train": []} for k in PEERS}
    for k in PEERS:  # warm-up
        forward(k)()
        train(k)()
    for _ in range(rounds):  # alternate, so drift hits every model alike
        for k in PEERS:
            results[k]["forward"].append(batch / _time(forward(k), iters))
            results[k]["train"].append(batch / _time(train(k), iters))
    return {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}


MEM_CHILD = """
import sys, resource
sys.path.insert(0, {tools!r})
import torch, benchmark
torch.set_num_threads({threads})
model = benchmark.build({kind!r}, {arch!r}, {size}).train()
x = torch.randn({batch}, 3, {size}, {size})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {step}:
    torch.nn.functional.cross_entropy(model(x), torch.zeros({batch}, dtype=torch.long)).backward()
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure_memory(kind: str, arch: str, batch: int, size: int, threads: int) -> float:
    """MB by which one training step raises the peak RSS of a fresh process."""
    code = MEM_CHILD.format(tools=str(Path(__file__).parent), threads=threads, kind=kind, arch=arch,
                            size=size, batch=batch, step=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = map(int, out.stdout.split()[-2:])
    return (peak - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="convit_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mem-size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    speed = measure_speed(args.arch, args.batch, args.size, args.rounds, args.iters)
    memory = {k: measure_memory(k, args.arch, args.batch, args.mem_size, args.threads) for k in ("ours", "timm_convit")}
    ratios = {
        "forward_vs_timm_vit": speed["ours"]["forward"] / speed["timm_vit"]["forward"],
        "forward_vs_timm_convit": speed["ours"]["forward"] / speed["timm_convit"]["forward"],
        "train_vs_timm_vit": speed["ours"]["train"] / speed["timm_vit"]["train"],
        "train_vs_timm_convit": speed["ours"]["train"] / speed["timm_convit"]["train"],
    }
    if memory["timm_convit"] >= 1.0:  # below 1 MB the step does not lift the import-time peak: no ratio
        ratios[f"train_memory_{args.mem_size}px_vs_timm_convit"] = memory["ours"] / memory["timm_convit"]
    print(f"{args.arch}, batch {args.batch}, {args.size} px, fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<14}{'forward img/s':>15}{'train img/s':>14}{f'train peak MB @{args.mem_size}':>20}")
    for k in PEERS:
        mem = f"{memory[k]:.0f}" if k in memory else "-"
        print(f"{k:<14}{speed[k]['forward']:>15.1f}{speed[k]['train']:>14.1f}{mem:>20}")
    for name, value in ratios.items():
        print(f"{name:<36}{value:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "speed": speed, "memory_mb": memory,
                                               "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
