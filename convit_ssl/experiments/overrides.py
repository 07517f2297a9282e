"""The Hydra overrides that place a run on its data, switch on the online kNN
monitor and pick the architecture twin: one builder each, for the demo, the
sweeps, the GPU check and the tests."""

from __future__ import annotations

import os
from pathlib import Path

# The DeiT of identical dimensions: the same blocks, all plain self-attention.
ARCHS: dict[str, list[str]] = {"convit": [], "deit": ["config.MODEL.TRUNK.CONVIT_SSL.NUM_GPSA_LAYERS=0"]}


def arch_overrides(arch: str) -> list[str]:
    """`convit` (the config's trunk) or `deit` (its twin without GPSA)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return list(ARCHS[arch])


def train_overrides(train: os.PathLike) -> list[str]:
    """An image folder (one sub-folder per class) as the training split."""
    return [f"config.DATA.TRAIN.DATA_PATHS=[{Path(train)}]", f"config.DATA.TRAIN.LABEL_PATHS=[{Path(train)}]"]


def data_overrides(train: os.PathLike, val: os.PathLike) -> list[str]:
    """Image folders as the training and the test split."""
    return [
        *train_overrides(train),
        f"config.DATA.TEST.DATA_PATHS=[{Path(val)}]",
        f"config.DATA.TEST.LABEL_PATHS=[{Path(val)}]",
    ]


def knn_overrides(train: os.PathLike, val: os.PathLike, frequency_epochs: int, teacher: bool = False) -> list[str]:
    """The online kNN monitor (`convit_ssl.vissl.hooks.knn`): `train` as the memory
    bank, `val` as the queries, a record at iteration 0 (the trunk at random
    init) and every `frequency_epochs` epochs; `teacher` also measures the momentum
    teacher (DINO, MoCo)."""
    return [
        "+config/convit_ssl/hooks=knn",
        f"config.HOOKS.CONVIT_KNN.TRAIN_PATHS=[{Path(train)}]",
        f"config.HOOKS.CONVIT_KNN.VAL_PATHS=[{Path(val)}]",
        f"config.HOOKS.CONVIT_KNN.FREQUENCY_EPOCHS={frequency_epochs}",
        f"config.HOOKS.CONVIT_KNN.TEACHER={'true' if teacher else 'false'}",
    ]
