"""Checks that run before VISSL spawns any process, so that a bad config or a
missing dataset fails at once with a message naming it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from vissl.data.dataset_catalog import VisslDatasetCatalog

import convit_ssl.vissl.training.device_augment as device_augment
from convit_ssl.data.subsets import MODES
from convit_ssl.files import is_image
from convit_ssl.vissl.configs import used_splits
from convit_ssl.vissl.model.trunk import TRUNK_NAME, parse_feature_names, validate_trunk_config
from convit_ssl.vissl.run.hooks import validate_hook_configs
from convit_ssl.vissl.training.llrd import validate_layer_decay
from convit_ssl.vissl.training.task import TASK_NAME


def _folder_classes(path: str, where: str) -> list[str]:
    """The class names of an image folder (path/<class>/<image>); every class
    folder must hold an image (torchvision's ImageFolder, which VISSL uses, fails
    inside each rank otherwise)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: data folder {path!r} does not exist")
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise FileNotFoundError(f"{where}: {path!r} has no class sub-folders (expected {path}/<class>/<image>)")
    empty = [name for name in classes if not _holds_an_image(os.path.join(path, name))]
    if len(empty) == len(classes):
        raise FileNotFoundError(f"{where}: no images in the class folders of {path!r}")
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise FileNotFoundError(
            f"{where}: {len(empty)} of {len(classes)} class folders of {path!r} hold no image ({shown}); "
            "add images or remove the folders"
        )
    return classes


def _holds_an_image(folder: str) -> bool:
    with os.scandir(folder) as entries:  # stops at the first image: cheap for ImageNet's folders
        return any(is_image(entry.name) for entry in entries)


def _filelist_classes(path: str) -> int | None:
    """The number of classes of a disk_filelist label file: N integers (max + 1)
    or N x C (C); None for another layout (VISSL reads it as it does)."""
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):  # pickled objects, text file lists: not checked here
        return None
    if labels.ndim == 2:
        return int(labels.shape[1])
    if labels.ndim == 1 and labels.size and np.issubdtype(labels.dtype, np.integer):
        return int(labels.max()) + 1
    return None


def _resolve(block: Any, split: str, key: str, i: int, name: str, where: str) -> str:
    """Path `i` of DATA_PATHS / LABEL_PATHS, or the dataset catalog's for `name`."""
    paths, sources = block[f"{key}_PATHS"], block[f"{key}_SOURCES"]
    if paths:
        if len(paths) != len(sources):
            raise ValueError(
                f"config.DATA.{split}: {len(sources)} {key}_SOURCES but {len(paths)} {key}_PATHS; "
                "give one path per source"
            )
        return paths[i]
    if VisslDatasetCatalog.has_data(name):
        return VisslDatasetCatalog.get(name)["train" if split == "TRAIN" else "val"][0 if key == "DATA" else 1]
    raise FileNotFoundError(
        f"{where}: no path given and the name is not in the dataset catalog; set "
        f"config.DATA.{split}.DATA_PATHS=[<folder>] (and LABEL_PATHS for disk_folder labels) "
        "or point VISSL_DATASET_CATALOG_PATH at a catalog that defines it"
    )


def validate_data(config: Any) -> dict[str, Any]:
    """Every dataset a run reads resolves to existing data; image folders hold
    images in every class folder. Returns each split's classes where its labels
    say (a list of names for disk_folder, a count for disk_filelist)."""
    classes: dict[str, Any] = {}
    folders: dict[str, list[str]] = {}  # path -> classes: a folder given as data and labels is scanned once

    def folder_classes(path: str, where: str) -> list[str]:
        if path not in folders:
            folders[path] = _folder_classes(path, where)
        return folders[path]

    for split in used_splits(config):
        block = config.DATA[split]
        if block.DATA_PATHS and not block.LABEL_PATHS:
            # VISSL looks labels up in the catalog whenever LABEL_PATHS is empty (even
            # for methods that read none) and fails inside the rank if the name is absent.
            absent = [
                n
                for n, src in zip(block.DATASET_NAMES, block.DATA_SOURCES)
                if src != "synthetic" and not VisslDatasetCatalog.has_data(n)
            ]
            if absent:
                raise ValueError(
                    f"config.DATA.{split}: DATA_PATHS is set but LABEL_PATHS is empty and {absent} is not in the "
                    f"dataset catalog; set config.DATA.{split}.LABEL_PATHS to the same folder(s) as DATA_PATHS"
                )
        for i, source in enumerate(block.DATA_SOURCES):
            if source == "synthetic":
                continue
            name = block.DATASET_NAMES[i] if i < len(block.DATASET_NAMES) else f"#{i}"
            where = f"config.DATA.{split} dataset {name!r} ({source})"
            path = _resolve(block, split, "DATA", i, name, where)
            if source == "disk_folder":
                folder_classes(path, where)
            elif not os.path.exists(path):
                raise FileNotFoundError(f"{where}: {path!r} does not exist")
        for i, source in enumerate(block.LABEL_SOURCES):
            if source not in ("disk_folder", "disk_filelist") or not (block.LABEL_PATHS or block.DATA_PATHS):
                continue
            name = block.DATASET_NAMES[i] if i < len(block.DATASET_NAMES) else f"#{i}"
            where = f"config.DATA.{split} labels of {name!r} ({source})"
            path = _resolve(block, split, "LABEL", i, name, where)
            if source == "disk_folder":
                found = folder_classes(path, where)
            elif not os.path.exists(path):
                raise FileNotFoundError(f"{where}: label file {path!r} does not exist")
            else:
                found = _filelist_classes(path)
            if i == 0 and found is not None:
                classes[split] = found
    if isinstance(classes.get("TRAIN"), list) and isinstance(classes.get("TEST"), list):
        _check_same_classes(classes["TRAIN"], classes["TEST"])
    return classes


def _check_same_classes(train: list[str], test: list[str]) -> None:
    """ImageFolder numbers classes by sorted name: different sets shift every label."""
    if train == test:
        return
    missing, extra = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    parts = ([f"missing in TEST: {', '.join(missing[:5])}"] if missing else []) + (
        [f"only in TEST: {', '.join(extra[:5])}"] if extra else []
    )
    raise ValueError(
        f"config.DATA.TRAIN and config.DATA.TEST have different class folders ({len(train)} and {len(test)}; "
        f"{'; '.join(parts)}): labels are the sorted folder names' positions, so every label after the "
        "first difference would be wrong"
    )


# Losses whose targets are class indices that the head's outputs must cover.
CLASSIFICATION_LOSSES = ("cross_entropy_multiple_output_single_target",)


def validate_head_classes(config: Any, classes: dict[str, Any]) -> None:
    """A classifier head (mlp / eval_mlp) and the mixup collator have one output
    per class of the training labels."""
    found = classes.get("TRAIN")
    if found is None or config.LOSS.name not in CLASSIFICATION_LOSSES:
        return
    count = len(found) if isinstance(found, list) else found
    heads = list(config.MODEL.HEAD.PARAMS)
    settings = config.MODEL.FEATURE_EVAL_SETTINGS
    if settings.EVAL_MODE_ON and settings.LINEAR_EVAL_FEAT_POOL_OPS_MAP:
        outputs = range(len(heads))  # linear evaluation: one classifier per feature
    else:
        outputs = range(len(heads))[-1:]  # a chain of heads that ends in the classifier
    for i in outputs:
        name, params = heads[i][0], heads[i][1] if len(heads[i]) > 1 else {}
        dims = params.get("dims") if name in ("mlp", "eval_mlp") else None
        if dims and dims[-1] != count:
            raise ValueError(
                f"config.MODEL.HEAD.PARAMS[{i}] ({name}) has {dims[-1]} outputs but the training labels have "
                f"{count} classes; set its dims to end in {count}"
            )
    train = config.DATA.TRAIN
    if train.COLLATE_FUNCTION == "cutmixup_collator":
        declared = train.COLLATE_FUNCTION_PARAMS.get("num_classes")
        if declared != count:
            raise ValueError(
                f"config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes is {declared} but the training labels have "
                f"{count} classes"
            )


def validate_task(config: Any) -> None:
    """convit_ssl's sampler keys are refused under a task that would ignore them."""
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
    validate_task(config)
    device_augment.validate(config, TASK_NAME)
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
    validate_head_classes(config, validate_data(config))
