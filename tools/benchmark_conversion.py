#!/usr/bin/env python
"""Speed and memory of checkpoint conversion against plain torch.load + torch.save.

    python tools/benchmark_conversion.py [--arch convit_base] [--repeats 3] [--json out.json]

Builds a ConViT of `--arch` with random weights, saves it as a timm state dict,
then measures in this process, alternating, best of `--repeats`:
  baseline  torch.load + torch.save of the same file;
  convert   timm -> vissl with verify=false (load, detect, read, write, atomic save).
Peak memory is measured in fresh subprocesses (ru_maxrss) minus the peak of a
process that only imports convit_ssl, and compared with the file size.
Targets: convert time <= 1.5x baseline, convert peak <= 2.5x file size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import convit_ssl
from convit_ssl.checkpoints.convert import ConvertConfig, convert

CHILD = {
    "make": "import convit_ssl, torch, sys; torch.save(convit_ssl.create_model(sys.argv[1]).state_dict(), sys.argv[2])",
    "import": "import convit_ssl, torch",
    "baseline": "import convit_ssl, torch, sys; torch.save(torch.load(sys.argv[1], weights_only=True), sys.argv[2])",
    "convert": (
        "import convit_ssl, sys\n"
        "from convit_ssl.checkpoints.convert import ConvertConfig, convert\n"
        "convert(ConvertConfig(input=sys.argv[1], output=sys.argv[2], source_format='timm', target_format='vissl',"
        " verify=False, overwrite=True), log=lambda s: None)\n"
    ),
}


def peak_rss_mb(code: str, *args: str) -> float:
    """Peak resident memory (MB) of a fresh Python running `code`. Linux carries a
    forked child's high-water mark over from its parent, so these run while this
    process is still small, and are compared with a child that only imports."""
    script = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="convit_base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src, out_base, out_conv = (Path(tmp) / n for n in ("timm.pth", "baseline.pth", "vissl.torch"))
        peak_rss_mb(CHILD["make"], args.arch, str(src))
        size_mb = src.stat().st_size / 2**20
        base_rss = peak_rss_mb(CHILD["import"])
        peaks = {
            name: peak_rss_mb(CHILD[name], str(src), str(Path(tmp) / f"{name}.out")) - base_rss
            for name in ("baseline", "convert")
        }
        with torch.device("meta"):
            params = sum(p.numel() for p in convit_ssl.create_model(args.arch).parameters())

        times = {"baseline": [], "convert": []}
        cfg = ConvertConfig(
            input=str(src),
            output=str(out_conv),
            source_format="timm",
            target_format="vissl",
            verify=False,
            overwrite=True,
        )
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.save(torch.load(src, map_location="cpu", weights_only=True), out_base)
            times["baseline"].append(time.perf_counter() - start)
            start = time.perf_counter()
            convert(cfg)
            times["convert"].append(time.perf_counter() - start)

    best = {k: min(v) for k, v in times.items()}
    result = {
        "arch": args.arch,
        "params_millions": round(params / 1e6, 2),
        "file_mb": round(size_mb, 1),
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "time_ratio_convert_vs_load_save": round(best["convert"] / best["baseline"], 3),
        "peak_mb_above_import": {k: round(v, 1) for k, v in peaks.items()},
        "peak_ratio_convert_vs_file": round(peaks["convert"] / size_mb, 3),
        "targets": {"time_ratio": 1.5, "peak_ratio": 2.5},
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    print(f"{args.arch}: {result['params_millions']}M parameters, file {result['file_mb']} MB")
    print(f"{'':<24}{'seconds (best)':>16}{'peak MB':>10}")
    for name in ("baseline", "convert"):
        label = "torch.load + torch.save" if name == "baseline" else "convert (verify=false)"
        print(f"{label:<24}{best[name]:>16.3f}{peaks[name]:>10.1f}")
    print(f"time ratio convert / load+save: {result['time_ratio_convert_vs_load_save']:.2f}x (target <= 1.5x)")
    print(f"peak memory convert / file size: {result['peak_ratio_convert_vs_file']:.2f}x (target <= 2.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
