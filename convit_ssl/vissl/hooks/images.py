"""The images a training hook measures on, read by VISSL's own data sources
without randomness: `eval_transforms` (Resize, CenterCrop, ToTensor, the
split's Normalize), the held-out split (TEST when the run reads it, else
TRAIN) and its first images (`load_held_out_images`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from vissl.data import build_dataset

from convit_ssl.vissl.configs import used_splits


def held_out_split(config: Any) -> str:
    """TEST when the run reads its TEST split (and it has data sources), else TRAIN."""
    if "TEST" in used_splits(config) and config.DATA.TEST.DATA_SOURCES:
        return "TEST"
    return "TRAIN"


def eval_transforms(config: Any, split: str, image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """VISSL transform list without randomness: Resize, CenterCrop to `image_size`
    (H, W), ToTensor, and the Normalize of `split` (else of TRAIN), if any."""
    height, width = image_size
    transforms: list[dict[str, Any]] = [
        {"name": "Resize", "size": max(height, width)},
        {"name": "CenterCrop", "size": [height, width]},
        {"name": "ToTensor"},
    ]
    for source in (split, "TRAIN"):
        normalize = [t for t in config.DATA[source].TRANSFORMS if t.get("name") == "Normalize"]
        if normalize:
            transforms.append(
                {"name": "Normalize", "mean": list(normalize[-1]["mean"]), "std": list(normalize[-1]["std"])}
            )
            break
    return transforms


def load_held_out_images(
    config: Any, num_images: int, image_size: tuple[int, int], who: str = "the hook"
) -> torch.Tensor:
    """(B, C, H, W) the first `num_images` samples (fewer if the split is smaller)
    of the held-out split, transformed by `eval_transforms`, on the CPU; errors
    name `who` (the hook's config block) and the split."""
    split = held_out_split(config)
    where = f"{who}: held-out images from config.DATA.{split} {list(config.DATA[split].DATASET_NAMES)}"
    local = copy.deepcopy(config)
    local.DATA[split].TRANSFORMS = eval_transforms(config, split, image_size)
    local.DATA[split].LABEL_SOURCES = []  # images only: labels are not read
    try:
        dataset = build_dataset(local, split)
        count = min(num_images, len(dataset))
        items = [dataset[i] for i in range(count)]
    except Exception as e:
        raise RuntimeError(f"{where}: could not be read ({type(e).__name__}: {e})") from e
    if count == 0:
        raise RuntimeError(f"{where}: the split has no samples")
    bad = [i for i, item in enumerate(items) if item["data_valid"][0] != 1]
    if bad:
        raise RuntimeError(f"{where}: samples {bad} could not be read (VISSL returned placeholder images)")
    return torch.stack([item["data"][0] for item in items])
