#!/usr/bin/env python
"""Throughput and memory of convit_ssl's ConViT against timm's ConViT and a timm
ViT of identical dimensions, measured in one process, in alternation.

    python tools/benchmark.py [--arch convit_tiny convit_small] [--batch 32] [--size 224]
                              [--mem-size 384] [--mem-batch 32] [--modes fp32 compile export bf16]
                              [--device cpu] [--json benchmark.json]

For each architecture and mode (fp32 eager, fp32 under torch.compile, fp32
through torch.export (the exported program's module; inference only), bf16
autocast) the three models are timed in alternation: forward images/s
(inference) and training-step images/s (forward, backward, AdamW step). The
peak memory of one fp32 training step at --mem-size px is measured for ours
(also with activation checkpointing) and timm's ConViT: on CPU in fresh
subprocesses (the peak RSS of the step above the RSS of the built model and its
input, Linux), on CUDA as the peak allocated memory. Ratios are against the peers measured in
the same run; the issue's targets are checked for convit_tiny in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import convit_ssl

PEERS = ("ours", "timm_convit", "timm_vit")
MODES = ("fp32", "compile", "export", "bf16")
# (ratio name, comparison, bound) for convit_tiny, CPU fp32
TARGETS = {
    "forward_vs_timm_vit": (">=", 0.90),
    "forward_vs_timm_convit": (">=", 2.0),
    "train_vs_timm_vit": (">=", 0.85),
    "train_vs_timm_convit": (">=", 1.5),
    "train_memory_vs_timm_convit": ("<=", 0.6),
}


def build(kind: str, arch: str, size: int) -> torch.nn.Module:
    """`ours` (convit_ssl), `timm_convit` (timm's ConVit), `timm_vit` (timm ViT, same dims);
    `ours_ckpt` is ours with activation checkpointing."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = convit_ssl.models.ARCHITECTURES[arch]
    if kind in ("ours", "ours_ckpt"):
        model = convit_ssl.create_model(arch, img_size=size)
        model.set_grad_checkpointing(kind == "ours_ckpt")
        return model
    if kind == "timm_convit":
        if arch in timm.list_models("convit_*"):
            return timm.create_model(arch, img_size=size)
        return timm.models.convit.ConVit(
            img_size=size,
            embed_dim=spec["width"] // spec["num_heads"],
            num_heads=spec["num_heads"],
            local_up_to_layer=spec["num_gpsa_layers"],
        )
    return VisionTransformer(
        img_size=size, embed_dim=spec["width"], depth=spec["depth"], num_heads=spec["num_heads"], qkv_bias=False
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure_speed(arch: str, mode: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median forward and training-step images/s of the three peers in `mode`."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {k: build(k, arch, args.size).to(device) for k in PEERS}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if mode == "export":  # the exported program, as a deployment runs it
        runners = {k: torch.export.export(m.eval(), (x,)).module() for k, m in models.items()}
    else:
        runners = {k: torch.compile(m) if mode == "compile" else m for k, m in models.items()}
    steps = ("forward",) if mode == "export" else ("forward", "train")
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    target = torch.randint(0, 1000, (args.batch,), device=device)

    def precision():
        if mode == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(k):
        def run():
            if mode != "export":  # an exported module has no train/eval switch
                models[k].eval()
            with torch.inference_mode(), precision():
                runners[k](x)

        return run

    def train(k):
        def run():
            models[k].train()
            with precision():
                loss = torch.nn.functional.cross_entropy(runners[k](x).float(), target)
            optims[k].zero_grad(set_to_none=True)
            loss.backward()
            optims[k].step()

        return run

    step_fns = {"forward": forward, "train": train}
    results: dict[str, dict[str, list[float]]] = {k: {step: [] for step in steps} for k in PEERS}
    for k in PEERS:  # warm-up (and compilation)
        for _ in range(2):
            for step in steps:
                step_fns[step](k)()
    for _ in range(args.rounds):  # alternate, so drift hits every model alike
        for k in PEERS:
            for step in steps:
                results[k][step].append(args.batch / _time(step_fns[step](k), args.iters, device))
    return {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}


MEM_CHILD = """
import sys
sys.path.insert(0, {tools!r})
import torch, benchmark
torch.set_num_threads({threads})
model = benchmark.build({kind!r}, {arch!r}, {size}).train()
x = torch.randn({batch}, 3, {size}, {size})
base = benchmark.reset_peak_rss()
torch.nn.functional.cross_entropy(model(x), torch.zeros({batch}, dtype=torch.long)).backward()
print(base, benchmark.peak_rss())
"""


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS and return that (KB).

    Linux only (clear_refs, Linux >= 4.0). getrusage's ru_maxrss cannot be
    used: a child process starts from its parent's peak, which can exceed the
    step being measured."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kb("VmRSS")


def peak_rss() -> int:
    """Peak RSS (KB) since the last `reset_peak_rss`."""
    return _proc_status_kb("VmHWM")


def measure_memory(kind: str, arch: str, args: argparse.Namespace) -> float | None:
    """MB that one fp32 training step at --mem-size adds to the peak (see the module doc); None if it failed."""
    size, batch = args.mem_size, args.mem_batch
    if args.device.startswith("cuda"):
        device = torch.device(args.device)
        model = build(kind, arch, size).to(device).train()
        x = torch.randn(batch, 3, size, size, device=device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=device)).backward()
        peak = torch.cuda.max_memory_allocated(device)
        del model, x
        torch.cuda.empty_cache()
        return (peak - base) / 2**20
    code = MEM_CHILD.format(
        tools=str(Path(__file__).parent), threads=args.threads, kind=kind, arch=arch, size=size, batch=batch
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:  # e.g. killed for memory: report it, keep the other rows
        print(f"memory of {kind} {arch} failed (exit {out.returncode}): {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    base, peak = map(int, out.stdout.split()[-2:])
    return (peak - base) / 1024


def ratios_of(speed: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        f"{step}_vs_{peer}": speed["ours"][step] / speed[peer][step]
        for step in ("forward", "train")
        if step in speed["ours"]
        for peer in ("timm_vit", "timm_convit")
    }


def verdict(name: str, value: float) -> str:
    op, bound = TARGETS[name]
    ok = value >= bound if op == ">=" else value <= bound
    return f"target {op} {bound:.2f}x  {'met' if ok else 'MISSED'}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu


def bench_arch(arch: str, args: argparse.Namespace) -> dict:
    record: dict = {"speed": {}, "ratios": {}}
    for mode in args.modes:
        record["speed"][mode] = measure_speed(arch, mode, args)
        record["ratios"][mode] = ratios_of(record["speed"][mode])
    record["memory_mb"] = {k: measure_memory(k, arch, args) for k in ("ours", "ours_ckpt", "timm_convit")}
    reference = record["memory_mb"]["timm_convit"]
    if reference is not None and reference >= 1.0:  # below 1 MB the step did not show: no ratio
        record["memory_vs_timm_convit"] = {
            k: record["memory_mb"][k] / reference for k in ("ours", "ours_ckpt") if record["memory_mb"][k] is not None
        }
    return record


def report(arch: str, record: dict, args: argparse.Namespace) -> None:
    check_targets = arch == "convit_tiny" and args.device == "cpu"
    print(f"\n{arch}: batch {args.batch}, {args.size} px, {args.threads} threads, {args.device}")
    print(f"{'mode':<9}{'model':<13}{'forward img/s':>15}{'train img/s':>14}")
    for mode, speed in record["speed"].items():
        for k in PEERS:
            train = f"{speed[k]['train']:>14.1f}" if "train" in speed[k] else f"{'-':>14}"
            print(f"{mode:<9}{k:<13}{speed[k]['forward']:>15.1f}{train}")
    mem = {k: "failed" if v is None else f"{v:.0f} MB" for k, v in record["memory_mb"].items()}
    print(
        f"train-step peak memory, batch {args.mem_batch} @{args.mem_size} px: ours {mem['ours']}, "
        f"ours + activation checkpointing {mem['ours_ckpt']}, timm_convit {mem['timm_convit']}"
    )
    for mode, ratios in record["ratios"].items():
        for name, value in ratios.items():
            target = verdict(name, value) if check_targets and mode == "fp32" else ""
            print(f"  {mode + ' ' + name:<48}{value:>6.2f}x  {target}")
    for k, value in record.get("memory_vs_timm_convit", {}).items():
        target = verdict("train_memory_vs_timm_convit", value) if check_targets and k == "ours" else ""
        print(f"  {k + ' train_memory_vs_timm_convit':<48}{value:>6.2f}x  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["convit_tiny", "convit_small"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mem-size", type=int, default=384, help="image size of the memory rows")
    parser.add_argument("--mem-batch", type=int, default=32, help="batch of the memory rows")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = {
        "machine": machine() if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
    }
    print(f"{header['machine']}; torch {header['torch']}, python {header['python']}")
    results = {}
    for arch in args.arch:
        results[arch] = bench_arch(arch, args)
        report(arch, results[arch], args)
        if args.json:  # after every architecture, so a long run keeps what it measured
            Path(args.json).write_text(json.dumps({**header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
