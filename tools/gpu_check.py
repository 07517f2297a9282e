#!/usr/bin/env python
"""The GPU check: numbers, speed, memory and VISSL on one CUDA device, in one run.

Here, before any GPU time is spent (the last two also in CI, tests/test_gpu_check.py):

    python tools/gpu_check.py --download gpu_wheels           # tools/gpu_wheels.txt for CPython 3.12 (41 MB)
    python tools/gpu_check.py --install gpu_wheels --dry-run  # resolve the install against that folder only
    python tools/gpu_check.py --device cpu --quick --out DIR  # every step, tiny sizes

On the GPU machine (torch there; `gpu_wheels/` is git-ignored and carried with
the working tree, 64 MiB in all):

    python tools/gpu_check.py --install gpu_wheels --out $OUT   # sized for ~6 min on one GPU; never run on one yet

Steps, each recorded in DIR/gpu_check.json and printed as one table:

1. versions: torch, CUDA, cuDNN, driver, GPU name;
2. numbers: our GPSA on the fused path and on the explicit attention matrix,
   and timm's ConViT with the same weights: outputs and gradients, fp32 and
   bf16 autocast (tolerances in TOLERANCES);
3. speed (tools/benchmark.py, models in alternation with warm-up, medians):
   ours, timm's ConViT and a timm ViT of the same dimensions, forward and
   training step (forward, backward, AdamW), fp32 (TF32 as torch defaults),
   bf16 autocast, torch.compile, for convit_tiny and convit_small at batch
   128, 224 px; peak memory of a training step at 384 px with and without
   activation checkpointing; the targets in TARGETS;
4. augmentation on the device (DATA.TRAIN.DEVICE_AUGMENTATION): the
   photometric part of each self-supervised ImageNet recipe, batched on the
   device, in ms per image (64 images' crops at the recipe's sizes);
5. VISSL on the device: the supervised micro twin and the DINO twin
   (MACHINE.DEVICE=gpu, NCCL with one process, torch AMP), a linear evaluation
   from the supervised checkpoint, VISSL's feature extraction behind the kNN
   benchmark; each run must end with finite losses and its checkpoint must
   load on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "tools" / "gpu_wheels.txt"
sys.path.insert(0, str(REPO))  # the working tree, installed or not

# max |a - b| / max(1, max |b|): fp32 through different kernels (TF32 off for the check), bf16 autocast
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2}
# bf16 autocast, batch 128, 224 px, training step (the targets)
TARGETS = {"train_vs_timm_vit": (">=", 0.85), "train_vs_timm_convit": (">=", 1.6), "memory_vs_timm_convit": ("<=", 0.4)}


# ------------------------------------------------------------------ wheels
def requirements() -> list[str]:
    """(requirement, build?) lines of tools/gpu_wheels.txt."""
    out = []
    for line in WHEELS.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            out.append(spec + (" build" if line.rstrip().endswith("# build") else ""))
    return out


def download(folder: Path) -> None:
    """Fetch the wheels for CPython 3.12, x86_64 Linux (needs the package registry)."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = [r for r in requirements() if not r.endswith(" build")]
    build = [r.removesuffix(" build") for r in requirements() if r.endswith(" build")]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [
            *pip,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "-d",
            str(folder),
            *binary,
        ],
        check=True,
    )
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), *build], check=True)


def install(folder: Path, dry_run: bool) -> None:
    """Install the wheels of `folder` only (no index, no dependency resolution beyond the list)."""
    specs = [r.removesuffix(" build") for r in requirements()]
    command = [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "--no-index",
        "--no-deps",
        "--find-links",
        str(folder),
        *specs,
    ]
    if dry_run:  # resolve as the GPU machine will (CPython 3.12), install nothing
        command += [
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--target",
            str(folder / ".dry-run"),
        ]
    subprocess.run(command, check=True)


# ------------------------------------------------------------------ 1. versions
def versions(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    return info


# ------------------------------------------------------------------ 2. numbers
def numbers(device: str, quick: bool) -> dict[str, Any]:
    """Max relative differences of outputs and gradients: fused vs explicit, ours vs timm."""
    import torch
    from timm.models.convit import ConVit

    import convit_ssl

    torch.backends.cuda.matmul.allow_tf32 = False  # compare kernels, not TF32 rounding
    torch.backends.cudnn.allow_tf32 = False
    size, batch = (32, 2) if quick else (224, 8)
    kwargs = dict(img_size=size, patch_size=16 if not quick else 8, depth=4, num_gpsa_layers=2, num_classes=10)
    torch.manual_seed(0)
    ours = convit_ssl.create_model("convit_tiny", **kwargs).to(device)
    with torch.no_grad():
        for name, p in ours.named_parameters():  # look trained: the local init is too regular a test
            p.add_(0.02 * torch.randn_like(p) + (torch.randn_like(p) if name.endswith("gating_param") else 0))
    timm_model = ConVit(
        img_size=size,
        patch_size=kwargs["patch_size"],
        embed_dim=48,
        num_heads=4,
        depth=4,
        local_up_to_layer=2,
        num_classes=10,
    ).to(device)
    timm_model.load_state_dict(ours.state_dict(), strict=True)
    explicit = convit_ssl.create_model("convit_tiny", **kwargs, attn_drop_rate=1e-12).to(device)  # dropout > 0: A built
    explicit.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 3, size, size, device=device)

    def run(model, dtype):
        model.train()  # dropout p ~ 0 keeps the explicit path; no stochastic depth in these models
        model.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x)
        out.float().square().mean().backward()
        return out.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()

    result: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        reference = run(ours, dtype)
        for peer, model in (("explicit", explicit), ("timm", timm_model)):
            out, grads = run(model, dtype)
            diffs = {
                "output": rel(out, reference[0]),
                "gradient": max(rel(grads[n], g) for n, g in reference[1].items()),
            }
            result[f"{dtype}_fused_vs_{peer}"] = {
                **diffs,
                "tolerance": TOLERANCES[dtype],
                "ok": all(v <= TOLERANCES[dtype] for v in diffs.values()),
            }
    return result


# ------------------------------------------------------------------ 3. speed and memory
def speed(device: str, quick: bool) -> dict[str, Any]:
    """tools/benchmark.py in a child process (its --json output), with the issue's targets."""
    args = SimpleNamespace(
        device=device,
        batch=2 if quick else 128,
        size=32 if quick else 224,
        mem_size=64 if quick else 384,
        mem_batch=2 if quick else 32,
        threads=2,
        rounds=1 if quick else 5,
        iters=1 if quick else 10,
        # torch.compile of three models on a CPU takes minutes: the rehearsal skips it
        modes=["fp32", "bf16"] if quick and device == "cpu" else ["fp32", "bf16", "compile"],
    )
    archs = ["convit_tiny"] if quick else ["convit_tiny", "convit_small"]
    out: dict[str, Any] = {"settings": vars(args)}
    options = [
        x for key, value in vars(args).items() if key != "modes" for x in (f"--{key.replace('_', '-')}", str(value))
    ]
    with tempfile.TemporaryDirectory() as folder:
        numbers = Path(folder) / "speed.json"
        command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--arch", *archs, "--modes", *args.modes]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # installed or not
        subprocess.run([*command, *options, "--json", str(numbers)], check=True, env={**os.environ, "PYTHONPATH": path})
        measured = json.loads(numbers.read_text())["results"]
    for arch in archs:
        record = measured[arch]
        bf16 = record["ratios"]["bf16"]
        memory = record.get("memory_vs_timm_convit", {}).get("ours")
        record["targets"] = {
            "train_vs_timm_vit": _target("train_vs_timm_vit", bf16["train_vs_timm_vit"]),
            "train_vs_timm_convit": _target("train_vs_timm_convit", bf16["train_vs_timm_convit"]),
            "memory_vs_timm_convit": _target("memory_vs_timm_convit", memory),
        }
        out[arch] = record
    return out


def _target(name: str, value: Any) -> dict[str, Any]:
    op, bound = TARGETS[name]
    met = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


# ------------------------------------------------------------------ 4. augmentation on the device
def augment_cost(device: str, quick: bool) -> dict[str, Any]:
    """ms per image of each SSL recipe's device part (crops drawn at random, uint8, on the device)."""
    import torch

    from convit_ssl.vissl.configs import SSL_METHODS, compose
    from convit_ssl.vissl.training import device_augment

    images, reps = (4, 1) if quick else (64, 10)
    out: dict[str, Any] = {"images": images}
    for method, folder in SSL_METHODS.items():
        plan = device_augment.plan(
            compose([f"config=pretrain/{folder}/{method}_convit_small_in1k_224_300ep"])[1].DATA.TRAIN
        )
        augment, generator = plan.augment(), torch.Generator().manual_seed(0)
        groups = {}
        for position, size in enumerate(plan.crop_sizes()):
            groups.setdefault(size // 7 if quick else size, []).append(position)
        batches = [
            (
                torch.randint(0, 256, (images * len(pos), 3, size, size), dtype=torch.uint8, device=device),
                torch.tensor(pos).repeat_interleave(images),
            )
            for size, pos in groups.items()
        ]

        def run() -> None:  # timed within this iteration
            for batch, position in batches:  # noqa: B023
                augment(batch, position, generator)  # noqa: B023

        run()  # warm-up (kernels, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[method] = {
            "ms_per_image": round(1000 * (time.perf_counter() - start) / reps / images, 4),
            "crops": plan.crop_sizes(),
        }
    return out


# ------------------------------------------------------------------ 5. VISSL
def _image_folder(root: Path) -> Path:
    """A tiny labelled image folder (2 classes x 16 random 32 px images) for the extraction run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(16):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) // (2 if label == "a" else 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _device_overrides(device: str) -> list[str]:
    if device.startswith("cuda"):
        return [
            "config.MACHINE.DEVICE=gpu",
            "config.DISTRIBUTED.BACKEND=nccl",
            "config.MODEL.AMP_PARAMS.USE_AMP=true",
            "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
        ]
    return ["config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.BACKEND=gloo"]


def _vissl(command: str, overrides: list[str], folder: Path) -> dict[str, Any]:
    """`python -m convit_ssl.cli COMMAND OVERRIDES` (its seconds include the
    imports, 6-8 s), its output in FOLDER.log."""
    from convit_ssl.checkpoints import run_folder

    start = time.time()
    log = folder.with_name(folder.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output_file:
        returncode = subprocess.call(
            [sys.executable, "-m", "convit_ssl.cli", command, *overrides, f"config.CHECKPOINT.DIR={folder}"],
            stdout=output_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
    output = log.read_text(errors="replace")
    record: dict[str, Any] = {"returncode": returncode, "seconds": round(time.time() - start, 1)}
    if returncode != 0:
        record["error"] = output[-2000:]
        return record
    if (folder / run_folder.STDOUT).is_file():
        losses = run_folder.losses(folder)
        record["losses"] = [losses[0], losses[-1]] if losses else []
        record["finite"] = bool(losses) and all(math.isfinite(v) for v in losses)
    final = run_folder.final_checkpoint(folder)
    if final is not None:
        from convit_ssl.checkpoints.io import load_checkpoint

        record["checkpoint"] = final.name
        record["loads_on_cpu"] = isinstance(load_checkpoint(final), dict)
    record["output_tail"] = output.strip().splitlines()[-1:] if command != "run" else []
    return record


def vissl_runs(device: str, out: Path) -> dict[str, Any]:
    from convit_ssl.checkpoints import run_folder
    from convit_ssl.experiments.overrides import data_overrides

    on = _device_overrides(device)
    runs: dict[str, Any] = {}
    runs["supervised"] = _vissl("run", ["config=test/convit_ssl/supervised_micro_synthetic", *on], out / "supervised")
    runs["dino"] = _vissl("run", ["config=test/convit_ssl/ssl/dino_micro_synthetic", *on], out / "dino")
    supervised = out / "supervised"
    weights = run_folder.final_checkpoint(supervised)
    init = [f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}"] if weights is not None else []
    runs["linear_eval"] = _vissl(
        "run", ["config=test/convit_ssl/linear_eval_micro_synthetic", *on, *init], out / "linear_eval"
    )
    data = _image_folder(out / "images")
    folders = data_overrides(data / "train", data / "val")
    runs["extraction_knn"] = _vissl(
        "knn", ["config=test/convit_ssl/benchmark/knn_micro_folder_in1k", *on, *folders, *init], out / "extraction_knn"
    )
    for record in runs.values():
        record["ok"] = record["returncode"] == 0 and record.get("finite", True) and record.get("loads_on_cpu", True)
    return runs


# ------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [
        f"{v.get('gpu', v['device'])}; torch {v['torch']}, CUDA {v['cuda']}, driver {v.get('driver')}, "
        f"Python {v['python']}",
        "",
        f"{'check':<46}{'value':>12}  verdict",
    ]
    lines += [
        f"{name + ' FAILED':<46}{'':>12}  {result[name]['error']}"
        for name in ("numbers", "speed", "augment", "vissl")
        if "error" in result[name]
    ]
    for name, row in ({} if "error" in result["numbers"] else result["numbers"]).items():
        lines.append(
            f"{'numbers ' + name:<46}{max(row['output'], row['gradient']):>12.2e}  "
            f"{'ok' if row['ok'] else 'FAILED'} (tolerance {row['tolerance']:g})"
        )
    for arch, record in result["speed"].items():
        if arch in ("settings", "error", "traceback"):
            continue
        for mode, speeds in record["speed"].items():
            for peer, s in speeds.items():
                lines.append(
                    f"{f'{arch} {mode} {peer} img/s fwd / train':<46}{s['forward']:>6.0f} / {s['train']:<6.0f}"
                )
        for name, target in record["targets"].items():
            value = "n/a" if target["value"] is None else f"{target['value']:.2f}x"
            lines.append(
                f"{f'{arch} bf16 {name}':<46}{value:>12}  {target['target']} {'met' if target['met'] else 'MISSED'}"
            )
    for name, record in ({} if "error" in result["augment"] else result["augment"]).items():
        if name != "images":
            lines.append(f"{'augmentation on the device ' + name + ' ms/img':<46}{record['ms_per_image']:>12.3f}")
    for name, record in ({} if "error" in result["vissl"] else result["vissl"]).items():
        detail = f"{record['seconds']} s" + (f", loss {record['losses']}" if record.get("losses") else "")
        lines.append(f"{'VISSL ' + name:<46}{'ok' if record['ok'] else 'FAILED':>12}  {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (quick mode's rehearsal)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a rehearsal of every step")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--download", metavar="DIR", help="fetch the wheels of tools/gpu_wheels.txt into DIR and stop")
    parser.add_argument("--install", metavar="DIR", help="pip install the wheels of DIR (no index) first")
    parser.add_argument("--dry-run", action="store_true", help="with --install: resolve only, then stop")
    args = parser.parse_args(argv)
    # child processes (VISSL runs, the CPU memory rows) import the working tree too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if args.download:
        download(Path(args.download))
        return 0
    if args.install:
        install(Path(args.install), args.dry_run)
        if args.dry_run:
            return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "versions": versions(args.device),
    }
    steps = (
        ("numbers", lambda: numbers(args.device, args.quick)),
        ("speed", lambda: speed(args.device, args.quick)),
        ("augment", lambda: augment_cost(args.device, args.quick)),
        ("vissl", lambda: vissl_runs(args.device, out / "vissl")),
    )
    for name, step in steps:  # each step's result is written as soon as it exists; a failure does not stop the rest
        start = time.time()
        try:
            result[name] = step()
        except Exception as e:  # one GPU run: keep what the other steps measure
            import traceback

            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result.setdefault("seconds", {})[name] = round(time.time() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    failed = [name for name, _ in steps if "error" in result[name]]
    ok = (
        not failed
        and all(r["ok"] for r in result["numbers"].values())
        and all(r["ok"] for r in result["vissl"].values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
