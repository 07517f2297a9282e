"""Shared fixtures: the digits image folder and a runner for real VISSL engine runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

import convit_ssl  # noqa: F401  (shims before anything imports VISSL)

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
