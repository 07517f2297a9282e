"""Class-balanced subsets of a labelled dataset, for the data-efficiency runs.

The ConViT paper trains on the first int(n_c * fraction) images of each class
c, in the dataset's sorted order (its official code; ImageFolder lists files
sorted by class folder, then file name). A seeded random choice per class is
the alternative. Both are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("first_per_class", "random_per_class")


def subset_indices(labels: Sequence[int], fraction: float, mode: str = "first_per_class", seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of the subset: for each class with n_c samples,
    int(n_c * fraction) of them (the first ones in order, or a seeded random
    choice). fraction 1.0 keeps everything."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    if mode not in MODES:
        raise ValueError(f"subset mode {mode!r} is not one of {', '.join(MODES)}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"expected one label per sample, got an array of shape {labels.shape}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)  # in dataset order
        keep = int(len(members) * fraction)
        if mode == "random_per_class":
            members = np.sort(rng.choice(members, size=keep, replace=False))
        chosen.append(members[:keep])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
