"""Checks that run before VISSL spawns any process, so that a bad config or a
missing dataset fails at once with a message naming it."""

from __future__ import annotations

import os
from typing import Any, List

from convit_ssl.files import is_image
from convit_ssl.vissl.trunk import TRUNK_NAME, parse_feature_names, validate_trunk_config



def used_splits(config: Any) -> List[str]:
    """The data splits a run reads: TRAIN unless TEST_ONLY; TEST if TEST_MODEL or TEST_ONLY."""
    splits = [] if config.TEST_ONLY else ["TRAIN"]
    if config.TEST_MODEL or config.TEST_ONLY:
        splits.append("TEST")
    return splits


def _check_image_folder(path: str, where: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: data folder {path!r} does not exist")
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise FileNotFoundError(f"{where}: {path!r} has no class sub-folders (expected {path}/<class>/<image>)")
    for name in classes:
        folder = os.path.join(path, name)
        if any(is_image(f) for f in os.listdir(folder)):
            return
    raise FileNotFoundError(f"{where}: no images in the class folders of {path!r}")


def validate_data(config: Any) -> None:
    """Every dataset a run reads resolves to existing data."""
    from vissl.data.dataset_catalog import VisslDatasetCatalog

    for split in used_splits(config):
        block = config.DATA[split]
        for i, source in enumerate(block.DATA_SOURCES):
            if source == "synthetic":
                continue
            name = block.DATASET_NAMES[i] if i < len(block.DATASET_NAMES) else f"#{i}"
            where = f"config.DATA.{split} dataset {name!r} ({source})"
            if block.DATA_PATHS:
                if len(block.DATA_PATHS) != len(block.DATA_SOURCES):
                    raise ValueError(
                        f"config.DATA.{split}: {len(block.DATA_SOURCES)} DATA_SOURCES but "
                        f"{len(block.DATA_PATHS)} DATA_PATHS; give one path per source"
                    )
                path = block.DATA_PATHS[i]
            elif VisslDatasetCatalog.has_data(name):
                path = VisslDatasetCatalog.get(name)["train" if split == "TRAIN" else "val"][0]
            else:
                raise FileNotFoundError(
                    f"{where}: no path given and the name is not in the dataset catalog; set "
                    f"config.DATA.{split}.DATA_PATHS=[<folder>] (and LABEL_PATHS for disk_folder labels) "
                    "or point VISSL_DATASET_CATALOG_PATH at a catalog that defines it"
                )
            if source == "disk_folder":
                _check_image_folder(path, where)
            elif not os.path.exists(path):
                raise FileNotFoundError(f"{where}: {path!r} does not exist")
        if block.DATA_PATHS and not block.LABEL_PATHS:
            # VISSL looks labels up in the catalog whenever LABEL_PATHS is empty (even
            # for methods that read none) and fails inside the rank if the name is absent.
            absent = [n for n, src in zip(block.DATASET_NAMES, block.DATA_SOURCES)
                      if src != "synthetic" and not VisslDatasetCatalog.has_data(n)]
            if absent:
                raise ValueError(
                    f"config.DATA.{split}: DATA_PATHS is set but LABEL_PATHS is empty and {absent} is not in the "
                    f"dataset catalog; set config.DATA.{split}.LABEL_PATHS to the same folder(s) as DATA_PATHS"
                )


def validate_task(config: Any) -> None:
    """convit_ssl's sampler keys are refused under a task that would ignore them."""
    from convit_ssl.data.subsets import MODES
    from convit_ssl.vissl.task import TASK_NAME

    train = config.DATA.TRAIN
    repeats = train.get("REPEATED_AUGMENTATIONS", 1) or 1
    subset = train.get("SUBSET") or {}
    if (repeats != 1 or subset) and config.TRAINER.TASK_NAME != TASK_NAME:
        raise ValueError(
            f"config.DATA.TRAIN.REPEATED_AUGMENTATIONS / SUBSET need config.TRAINER.TASK_NAME={TASK_NAME} "
            f"(got {config.TRAINER.TASK_NAME!r}, which would ignore them)"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"config.DATA.TRAIN.REPEATED_AUGMENTATIONS must be an integer >= 1, got {repeats!r}")
    unknown = sorted(set(subset) - {"FRACTION", "MODE", "SEED"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config.DATA.TRAIN.SUBSET; valid: FRACTION, MODE, SEED")
    if subset:
        fraction = subset.get("FRACTION")
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"config.DATA.TRAIN.SUBSET.FRACTION must be in (0, 1], got {fraction!r}")
        if subset.get("MODE", "first_per_class") not in MODES:
            raise ValueError(f"config.DATA.TRAIN.SUBSET.MODE {subset.get('MODE')!r} is not one of {', '.join(MODES)}")


def validate(config: Any) -> None:
    """All pre-launch checks for a VISSL config that uses the convit_ssl trunk."""
    from convit_ssl.vissl.hooks import validate_hook_configs
    from convit_ssl.vissl.llrd import validate_layer_decay

    validate_task(config)
    if config.SLURM.USE_SLURM and not config.SLURM.PARTITION:
        raise ValueError("config.SLURM.PARTITION must be set when config.SLURM.USE_SLURM=true")
    validate_hook_configs(config)
    validate_layer_decay(config)
    model = config.MODEL
    if model.TRUNK.NAME == TRUNK_NAME:
        trunk = validate_trunk_config(model)
        feature_map = model.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP
        if model.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON and feature_map:
            names = [item[0] for item in feature_map]
            try:
                parse_feature_names(names, trunk.depth)
            except ValueError as e:
                raise ValueError(f"config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP: {e}") from e
    validate_data(config)
