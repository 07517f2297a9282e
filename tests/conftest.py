"""Shared fixtures: one intra-op thread, the digits image folder and its VISSL filelists.
Plain helpers (paths, overrides, runners of VISSL jobs) are in helpers.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vissl") is not None:  # (without VISSL, the pure-PyTorch tests still run)
    import convit_ssl.vissl  # noqa: F401  (patches before anything imports VISSL)

# The longest files (pytest --durations in `make test`, 2026-12-01: about 7, 3, 2.5 and
# 2 min), run first: `make test` gives each worker one file at a time, and a long
# file taken last would leave the other worker idle for minutes.
LONGEST_FIRST = ("test_distributed.py", "test_demo.py", "test_ssl_quality.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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


@pytest.fixture(scope="module")
def feature_model():
    """A 3-block ConViT (2 GPSA + 1 MHSA) on a 4 x 6 grid, weights perturbed to look trained, eval mode."""
    from convit_ssl.models import create_model
    from helpers import perturb_

    torch.manual_seed(0)
    model = create_model(
        "convit_tiny", img_size=(32, 48), patch_size=8, depth=3, num_gpsa_layers=2, num_classes=5
    ).eval()
    perturb_(model, 1)
    return model
