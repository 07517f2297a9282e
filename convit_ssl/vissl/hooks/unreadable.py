"""A count, per phase, of the images VISSL could not read.

VISSL's datasets replace an image that fails to load by a grey one and warn
once per file ("Couldn't load: ..."), inside the data-loader workers, among
thousands of log lines; a training run on a folder with broken files goes on
with grey inputs. This hook, always on, sums the samples VISSL marked invalid
(`data_valid` = -1) over the ranks at the end of each phase and, when there are
any, the primary rank logs one warning with the count and the split and adds a
record to the run's metrics.json::

    {"phase_idx": 0, "train_phase_idx": 0, "unreadable_images": {"split": "train", "unreadable": 2, "images": 12}}
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from classy_vision.hooks.classy_hook import ClassyHook

from convit_ssl.checkpoints import run_folder
from convit_ssl.vissl.hooks.common import JsonLines, is_primary


def views_per_image(transforms: Any) -> int:
    """How many copies of each image the transforms make (each copy carries its `data_valid`)."""
    views = 1
    for transform in transforms or []:
        if transform.get("name") == "ImgReplicatePil":
            views = int(transform.get("num_times", 1))
        elif transform.get("name") == "ImgPilToMultiCrop":
            views = int(transform.get("total_num_crops", 1))
    return views


class UnreadableImagesHook(ClassyHook):
    on_start = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_update = ClassyHook._noop
    on_step = ClassyHook._noop
    on_end = ClassyHook._noop

    def __init__(self, metrics_path: str) -> None:
        super().__init__()
        self.metrics = JsonLines(metrics_path, run_folder.METRICS)
        self.invalid = self.seen = 0

    def on_phase_start(self, task: Any) -> None:
        self.invalid = self.seen = 0

    def on_forward(self, task: Any) -> None:
        valid = task.last_batch.sample.get("data_valid")
        if valid is None:
            return
        if isinstance(valid, (list, tuple)):  # one tensor per view in some collators
            valid = torch.cat([torch.as_tensor(v).flatten() for v in valid]) if valid else torch.zeros(0)
        self.invalid += int((valid < 0).sum())
        self.seen += valid.numel()

    def on_phase_end(self, task: Any) -> None:
        counts = torch.tensor([self.invalid, self.seen], dtype=torch.long, device=task.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        invalid, seen = counts.tolist()
        if invalid and is_primary():
            split = "TRAIN" if task.train else "TEST"
            views = views_per_image(task.config["DATA"][split]["TRANSFORMS"])
            count = {"split": split.lower(), "unreadable": invalid // views, "images": seen // views}
            logging.warning(
                "phase %d (%s): %d of %d images could not be read and were replaced by grey images "
                "(VISSL's 'Couldn't load' warnings name them)",
                task.phase_idx,
                count["split"],
                count["unreadable"],
                count["images"],
            )
            self.metrics.append(
                {
                    "phase_idx": int(task.phase_idx),
                    "train_phase_idx": int(task.train_phase_idx),
                    "unreadable_images": count,
                }
            )
