"""Shared fixtures: the digits image folder and a runner for real VISSL engine runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

if importlib.util.find_spec("vissl") is not None:  # (without VISSL, the pure-PyTorch tests still run)
    import convit_ssl.vissl  # noqa: F401  (patches before anything imports VISSL)

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO / "tools" / "run_distributed_engines.py"


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One intra-op thread for in-process tests: the models are tiny and the
    machine has 2 cores, where two threads contending with VISSL subprocesses
    (their own processes, unaffected) slow everything several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits exported once as root/{train,val}/<class>/*.png."""
    from convit_ssl.data import export_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    export_digits(root)
    return root


def folder_overrides(root: Path) -> List[str]:
    train, val = root / "train", root / "val"
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]", f"config.DATA.TRAIN.LABEL_PATHS=[{train}]",
        f"config.DATA.TEST.DATA_PATHS=[{val}]", f"config.DATA.TEST.LABEL_PATHS=[{val}]",
    ]


def run_engine(overrides: List[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python tools/run_distributed_engines.py OVERRIDES` from `cwd` (not the repo)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), *overrides], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"VISSL run failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def digits_filelists(digits, tmp_path_factory) -> Path:
    """The digits as VISSL filelists (disk_filelist): {train,test}_images.npy (paths),
    {train,test}_labels.npy (class indices, the Places205 layout) and
    {train,test}_voc_labels.npy (N x 10 of 1 / 0, the VOC07 layout)."""
    import numpy as np

    out = tmp_path_factory.mktemp("filelists")
    for split, name in (("train", "train"), ("val", "test")):
        paths = sorted((digits / split).glob("*/*.png"))
        classes = sorted({p.parent.name for p in paths})
        labels = np.array([classes.index(p.parent.name) for p in paths], dtype=np.int64)
        voc = np.zeros((len(paths), len(classes)), dtype=np.int32)
        voc[np.arange(len(paths)), labels] = 1
        np.save(out / f"{name}_images.npy", np.array([str(p) for p in paths]))
        np.save(out / f"{name}_labels.npy", labels)
        np.save(out / f"{name}_voc_labels.npy", voc)
    return out


def filelist_overrides(root: Path, labels: str) -> List[str]:
    """DATA_PATHS / LABEL_PATHS of `digits_filelists`; `labels` is "labels" or "voc_labels"."""
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{root / 'train_images.npy'}]",
        f"config.DATA.TRAIN.LABEL_PATHS=[{root / f'train_{labels}.npy'}]",
        f"config.DATA.TEST.DATA_PATHS=[{root / 'test_images.npy'}]",
        f"config.DATA.TEST.LABEL_PATHS=[{root / f'test_{labels}.npy'}]",
    ]


def run_tool(tool: str, overrides: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python tools/<tool>.py OVERRIDES` from `cwd`; fails the test on a non-zero exit."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *overrides], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tools/{tool}.py failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc
