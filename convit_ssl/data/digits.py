"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes)
exported as an image folder, so that VISSL's `disk_folder` source can read
them with no download.

Layout: ``<root>/train/<digit>/<index>.png`` and ``<root>/val/<digit>/<index>.png``,
with a fixed, stratified split (the same files on every machine).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DONE_MARKER = ".complete"


def export_digits(root: os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write the digits to ``root/train`` and ``root/val``; return both paths.

    Each class is shuffled with a fixed seed and its first ``val_fraction``
    goes to val. Writing happens in a temporary folder renamed into place, so
    an interrupted export leaves nothing half-written; an existing complete
    export is reused.
    """
    # optional dependency: scikit-learn, only to export the digits
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / DONE_MARKER).is_file():
        return root / "train", root / "val"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a complete digits export; remove it or choose another folder")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for label in range(10):
            indices = np.flatnonzero(digits.target == label)
            rng.shuffle(indices)
            n_val = int(round(len(indices) * val_fraction))
            for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
                folder = staging / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for index in sorted(chosen):
                    Image.fromarray(images[index]).save(folder / f"{index:04d}.png")
        (staging / DONE_MARKER).write_text("sklearn.datasets.load_digits\n")
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / "train", root / "val"


def train_val_folders(data: os.PathLike | None, out: os.PathLike) -> tuple[Path, Path]:
    """(train, val) image folders: ``data/train`` and ``data/val`` when `data` is given
    (each must exist, one sub-folder per class), else the digits exported to ``out/digits``."""
    if data is None:
        return export_digits(Path(out) / "digits")
    train, val = Path(data).resolve() / "train", Path(data).resolve() / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise ValueError(f"--data {data}: expected {folder} with one sub-folder per class")
    return train, val
