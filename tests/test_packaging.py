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
from pathlib import Path
import torch
import convit_ssl
from convit_ssl.analysis import analyze
from convit_ssl.checkpoints.convert import ConvertConfig, convert

torch.manual_seed(0)
model = convit_ssl.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, num_gpsa_layers=1, num_classes=3)
x = torch.randn(2, 3, 32, 32)
assert model.eval()(x).shape == (2, 3)
report = analyze(model, x)
assert len(report["layers"]) == 2
out = sys.argv[1]
torch.save(model.state_dict(), f"{out}/timm.pth")
result = convert(ConvertConfig(input=f"{out}/timm.pth", output=f"{out}/vissl.torch", target_format="vissl",
                               keep_head=False))
back = convert(ConvertConfig(input=f"{out}/vissl.torch", output=f"{out}/back.pth", target_format="timm"))
# a linear-evaluation checkpoint (eval_mlp head), verified against VISSL's head layout in plain PyTorch
ckpt = torch.load(f"{out}/vissl.torch", weights_only=True)
bn = torch.nn.BatchNorm1d(model.width)
bn.running_mean.uniform_(-1, 1)
bn.running_var.uniform_(0.5, 2)
heads = {f"0.channel_bn.{k}": v for k, v in bn.state_dict().items()}
heads.update({"0.clf.clf.0.weight": torch.randn(3, model.width), "0.clf.clf.0.bias": torch.randn(3)})
ckpt["classy_state_dict"]["base_model"]["model"]["heads"] = heads
torch.save(ckpt, f"{out}/linear_eval.torch")
folded = convert(ConvertConfig(input=f"{out}/linear_eval.torch", output=f"{out}/folded.pth", target_format="timm"))
assert folded["head_classes"] == 3 and "eval_mlp" in folded["notes"][-1], folded
try:  # VISSL's built-in trunk is the one reference that needs VISSL: a clear error, not a silent skip
    convert(ConvertConfig(input=f"{out}/timm.pth", output=f"{out}/vc.torch", target_format="vissl_convit"))
    raise SystemExit("vissl_convit was not verified")
except Exception as e:
    assert "vissl_convit_trunk=" in str(e) and "verify=false" in str(e), e
assert not (Path(out) / "vc.torch").exists()
print("ok", result["max_abs_diff"], back["max_abs_diff"], folded["max_abs_diff"])
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
