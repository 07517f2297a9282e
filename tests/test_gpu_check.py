"""tools/gpu_check.py before any GPU time is spent: with only what a GPU machine
with torch brings plus its wheel list importable, the check's imports work and
VISSL builds a model; and
the quick CPU rehearsal runs every step (numbers, speed, VISSL) to the end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

TOOL = REPO / "tools" / "gpu_check.py"
# What the lent machine has: torch and torchvision with their own dependencies.
ON_THE_GPU_MACHINE = {
    "torch",
    "torchvision",
    "triton",
    "numpy",
    "pillow",
    "filelock",
    "typing-extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "setuptools",
}
IMPORTS = """
import importlib.metadata, json, sys
allowed = set(json.loads(sys.argv[2]))
norm = lambda d: d.lower().replace("_", "-")
# every installed top-level module whose distribution the GPU machine would not have: unimportable
for module, dists in importlib.metadata.packages_distributions().items():
    if not any(norm(d) in allowed or norm(d).startswith(("nvidia-", "cuda-")) for d in dists):
        sys.modules[module] = None
sys.path.insert(0, sys.argv[1])
import gpu_check, benchmark
import convit_ssl.vissl, timm, timm.models.convit, timm.models.vision_transformer
import convit_ssl.vissl.benchmarks, convit_ssl.vissl.run.launcher, convit_ssl.vissl.training.device_augment
import kornia
from vissl.trainer import trainer_main
from vissl.models import build_model
from convit_ssl.vissl.configs import compose
_, config = compose(["config=test/convit_ssl/ssl/dino_micro_synthetic"])
build_model(config.MODEL, config.OPTIMIZER)
print("imports ok")
"""


def _name(requirement: str) -> str:
    return requirement.split("==")[0].strip().lower().replace("_", "-")


def test_wheel_list_covers_every_import_of_the_check():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    listed = {_name(r.removesuffix(" build")) for r in gpu_check.requirements()}
    allowed = sorted(listed | ON_THE_GPU_MACHINE | {"convit-ssl"})
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(REPO / "tools"), json.dumps(allowed)],
        capture_output=True,
        text=True,
        cwd=REPO.parent,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("imports ok"), proc.stderr[-3000:]
    assert "scikit-learn" not in listed and "tensorboard" not in listed  # not needed: 20 MB less to carry


@pytest.mark.slow
def test_quick_cpu_rehearsal_runs_every_step(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["numbers"]) == {f"{d}_fused_vs_{p}" for d in ("fp32", "bf16") for p in ("explicit", "timm")}
    assert all(row["ok"] for row in result["numbers"].values()), result["numbers"]
    assert result["numbers"]["fp32_fused_vs_timm"]["output"] < 1e-5  # fp32 on the CPU: summation order only
    record = result["speed"]["convit_tiny"]
    assert set(record["speed"]) == {"fp32", "bf16"} and set(record["speed"]["bf16"]) == {
        "ours",
        "timm_convit",
        "timm_vit",
    }
    assert set(record["targets"]) == {"train_vs_timm_vit", "train_vs_timm_convit", "memory_vs_timm_convit"}
    augment = result["augment"]
    assert set(augment) == {"images", "dino", "moco", "swav", "simclr", "barlow_twins", "deepclusterv2"}
    assert augment["dino"]["crops"] == [224] * 2 + [96] * 10 and augment["dino"]["ms_per_image"] > 0
    assert set(result["vissl"]) == {"supervised", "dino", "linear_eval", "extraction_knn"}
    for name, run in result["vissl"].items():
        assert run["ok"], (name, run.get("error"))
    assert result["vissl"]["supervised"]["loads_on_cpu"] and result["vissl"]["dino"]["finite"]
    assert "VISSL extraction_knn" in proc.stdout and "numbers fp32_fused_vs_timm" in proc.stdout
