"""Packaging: pyproject.toml's package list is the package folders, and what a
PyTorch user gets from `pip install .` alone (no VISSL, ClassyVision, Hydra or
matplotlib) works: the model, the converter, the analyses' numbers."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from helpers import REPO

# A fresh interpreter in which VISSL's world cannot be imported.
WITHOUT_VISSL = """
import sys
# None in sys.modules: `import` raises ModuleNotFoundError, importlib.util.find_spec answers None
for name in ("vissl", "classy_vision", "hydra", "fvcore", "iopath", "submitit", "matplotlib", "sklearn", "tensorboard"):
    sys.modules[name] = None
import torch
import convit_ssl
from convit_ssl.analysis import analyze
from convit_ssl.cli.convert import ConvertConfig, convert

torch.manual_seed(0)
model = convit_ssl.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, num_gpsa_layers=1, num_classes=3)
x = torch.randn(2, 3, 32, 32)
assert model.eval()(x).shape == (2, 3)
report = analyze(model, x)
assert len(report["layers"]) == 2
out = sys.argv[1]
torch.save(model.state_dict(), f"{out}/timm.pth")
result = convert(ConvertConfig(input=f"{out}/timm.pth", output=f"{out}/vissl.torch", target_format="vissl",
                               keep_head=False), log=lambda line: None)
back = convert(ConvertConfig(input=f"{out}/vissl.torch", output=f"{out}/back.pth", target_format="timm"),
               log=lambda line: None)
print("ok", result["max_abs_diff"], back["max_abs_diff"])
"""


def test_package_list_is_the_package_folders():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "convit_ssl").rglob("__init__.py")}
    assert listed == folders | {"convit_ssl.configs"}


def test_python_requirement_is_declared_and_met():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert sys.version_info >= (3, 10)
    assert {"3.11", "3.12", "3.13"} <= {c.rsplit(" ", 1)[-1] for c in project["classifiers"] if "Python :: 3." in c}


def test_pytorch_user_needs_no_vissl(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_VISSL, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, *diffs = proc.stdout.split()
    assert status == "ok" and all(float(d) < 1e-4 for d in diffs), proc.stdout
