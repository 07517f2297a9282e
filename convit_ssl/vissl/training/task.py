"""The `convit_ssl_task` VISSL task: VISSL's own task plus two DeiT/ConViT
recipe pieces that VISSL 0.1.6 lacks, both in the training sampler.

- Repeated augmentation (Hoffer et al. 2020; DeiT): each sampled image appears
  `DATA.TRAIN.REPEATED_AUGMENTATIONS` times in an epoch, the copies spread over
  consecutive ranks (so each gets its own augmentation), and an epoch keeps
  its usual length.
- Data-efficiency subsets (ConViT paper section 4): `DATA.TRAIN.SUBSET` with
  FRACTION, MODE (first_per_class, as the paper's code, or random_per_class)
  and SEED trains on a class-balanced part of the training set.

It also takes `OPTIMIZER.layer_decay` (layer-wise lr decay, llrd.py) and
`DATA.TRAIN.DEVICE_AUGMENTATION` (photometric augmentation on the training
device, device_augment.py). Select
with `TRAINER.TASK_NAME: convit_ssl_task`; the launcher's checks refuse these
keys under a task that would ignore them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from classy_vision.tasks import TASK_REGISTRY, register_task
from vissl.data import build_dataloader
from vissl.data.data_helper import StatefulDistributedSampler
from vissl.trainer.train_task import SelfSupervisionTask

import convit_ssl.vissl.training.device_augment as device_augment
from convit_ssl.data.subsets import subset_indices
from convit_ssl.vissl.training.llrd import LayerDecayTaskMixin

TASK_NAME = "convit_ssl_task"


class ConViTSampler(StatefulDistributedSampler):
    """VISSL's stateful sampler over `indices` (default: all), each index
    `num_repeats` times, epoch length len(indices) // world size per rank.

    The permutation depends on (seed, epoch) only, so every rank draws the same
    one and takes every world-size-th element: consecutive copies of an image
    land on different ranks. Resuming mid-epoch skips start_iter * batch_size.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        indices: np.ndarray | None = None,
        num_repeats: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, seed=seed)
        if num_replicas is not None:  # default: the process group's (as DistributedSampler)
            self.num_replicas, self.rank = num_replicas, rank
        if num_repeats < 1:
            raise ValueError(f"REPEATED_AUGMENTATIONS must be >= 1, got {num_repeats}")
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if len(self.indices) < self.num_replicas:
            raise ValueError(f"{len(self.indices)} training samples for {self.num_replicas} ranks")
        self.num_repeats = num_repeats
        self.num_samples = len(self.indices) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        stream = order.repeat_interleave(self.num_repeats)[: self.total_size]
        mine = stream[self.rank : self.total_size : self.num_replicas]
        assert len(mine) == self.num_samples
        return iter(mine[self.start_iter * self.batch_size :].tolist())


def _labels(dataset) -> np.ndarray:
    """Per-sample labels of a VISSL dataset's first label source."""
    if not getattr(dataset, "labels_init", False):
        dataset.load_labels()
    if not dataset.label_objs:
        raise ValueError("DATA.TRAIN.SUBSET needs labels (LABEL_SOURCES) to balance the classes")
    return np.asarray(dataset.label_objs[0])


def make_sampler(dataset, dataset_config: Any, sampler_seed: int = 0) -> ConViTSampler:
    """The training sampler for a DATA.TRAIN block with optional SUBSET / REPEATED_AUGMENTATIONS."""
    indices = None
    subset = dataset_config.get("SUBSET") or {}
    if subset and subset.get("FRACTION", 1.0) < 1.0:
        indices = subset_indices(
            _labels(dataset),
            float(subset["FRACTION"]),
            subset.get("MODE", "first_per_class"),
            int(subset.get("SEED", 0)),
        )
        logging.info(
            "training on a %s subset of %d / %d images (fraction %s)",
            subset.get("MODE", "first_per_class"),
            len(indices),
            len(dataset),
            subset["FRACTION"],
        )
    repeats = int(dataset_config.get("REPEATED_AUGMENTATIONS", 1) or 1)
    sampler = ConViTSampler(dataset, dataset_config["BATCHSIZE_PER_REPLICA"], sampler_seed, indices, repeats)
    logging.info(
        "convit_ssl sampler: %d of %d images, repeated augmentation x%d, %d samples per rank per epoch",
        len(sampler.indices),
        len(dataset),
        repeats,
        sampler.num_samples,
    )
    return sampler


class ConViTSSLTask(LayerDecayTaskMixin, SelfSupervisionTask):
    """VISSL's self_supervision_task with convit_ssl's training sampler,
    layer-wise lr decay when `OPTIMIZER.layer_decay` is set (see llrd.py), and
    device-side augmentation when `DATA.TRAIN.DEVICE_AUGMENTATION` is."""

    def build_datasets(self, current_train_phase_idx=0):
        """VISSL's datasets; with device-side augmentation the train dataset's
        transform is the loader's part of the split (uint8 crops)."""
        datasets, keys = super().build_datasets(current_train_phase_idx)
        if "train" in datasets and device_augment.enabled(self.config):
            plan = self.device_augment_plan = device_augment.plan(self.config.DATA.TRAIN)
            datasets["train"].transform = device_augment.LoaderTransform(plan)
            logging.info(
                "DEVICE_AUGMENTATION: the loader makes %d uint8 crops an image%s; on the %s device: %s",
                plan.num_crops,
                f" (then {[t['name'] for t in plan.loader_transforms]} on PIL)" if plan.loader_transforms else "",
                self.device.type,
                ", ".join(type(step.op).__name__ for step in plan.steps + plan.after) or "normalisation",
            )
        return datasets, keys

    def build_dataloaders(self, pin_memory: bool, current_train_phase_idx=0):
        """VISSL's loaders (same arguments as SelfSupervisionTask.build_dataloaders),
        the training one with `make_sampler`, and with device-side augmentation
        wrapped so that its batches come out augmented on the task's device."""
        plan = getattr(self, "device_augment_plan", None)
        loaders = {
            split.lower(): build_dataloader(
                dataset=self.datasets[split.lower()],
                dataset_config=device_augment.loader_collator(self.config["DATA"][split])
                if split == "TRAIN" and plan is not None
                else self.config["DATA"][split],
                num_dataloader_workers=self.config.DATA.NUM_DATALOADER_WORKERS,
                pin_memory=pin_memory,
                multi_processing_method=self.config.MULTI_PROCESSING_METHOD,
                device=self.device,
                sampler_seed=self.config["SEED_VALUE"],
                split=split.lower(),
                **({"get_sampler": make_sampler} if split == "TRAIN" else {}),
            )
            for split in self.available_splits
        }
        if plan is not None and "train" in loaders:
            train = self.config.DATA.TRAIN
            loaders["train"] = device_augment.DeviceAugmentedLoader(
                loaders["train"],
                plan,
                train.COLLATE_FUNCTION,
                self.device,
                lambda: self.iteration,
                int(self.config.SEED_VALUE),
                torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
                train.COLLATE_FUNCTION_PARAMS,
            )
        return loaders


def register() -> None:
    """Register the task with ClassyVision (idempotent)."""
    if TASK_REGISTRY.get(TASK_NAME) is ConViTSSLTask:
        return
    register_task(TASK_NAME)(ConViTSSLTask)
