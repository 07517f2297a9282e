"""Online kNN monitor: how well the features of the trunk being trained classify
a labelled held-out split, during training (solo-learn's and lightly's online
kNN; VISSL has none).

Switched on by the config block (absent = off; every key optional)::

    HOOKS.CONVIT_KNN:
      USE: false              # true: add the hook (needs MODEL.TRUNK.NAME: convit_ssl)
      FREQUENCY_EPOCHS: 1     # after every N training phases (epochs) ...
      FREQUENCY_ITERS: 0      # ... or, when N > 0, after every N training iterations instead
      AT_START: true          # also measure before the first iteration (the baseline of this init)
      FEATURE: lastCLS        # a convit_ssl trunk feature (see convit_ssl.vissl.model.trunk.named_features)
      TOPK: 20                # DINO's protocol: cosine similarity, k = 20,
      TEMPERATURE: 0.07       #   votes weighted by exp(similarity / T)
      TEACHER: false          # also the momentum teacher (DINO's or MoCo's loss)
      TRAIN_PATHS: []         # the memory bank, image folders DIR/<class>/<image>; [] = DATA.TRAIN's data
      VAL_PATHS: []           # the queries, the same layout; [] = DATA.TEST's data
      MAX_TRAIN_IMAGES: 10000 # bounds: an evenly strided subset (the same on every rank) above these
      MAX_VAL_IMAGES: 5000
      BATCH_SIZE: 256         # images per forward

``+config/convit_ssl/hooks=knn`` adds the block with USE: true.

At each trigger every rank extracts the features of its shard (every
world-size-th image) of both splits, with the trunk in eval mode under
no_grad, images transformed without randomness (Resize, CenterCrop to the
trunk's image size, ToTensor, the split's Normalize; see
`images.eval_transforms`); the shards are gathered, so the features
(and the result) are those of 1 process, and rank 0 classifies the queries
(`convit_ssl.evaluation.knn`) and logs one record::

    {"iteration", "epoch", "feature", "k", "temperature", "num_train", "num_val", "seconds",
     "student": {"top1", "top5"}, "teacher": {"top1", "top5"}}   # teacher: TEACHER only, once it exists

to ``<checkpoint folder>/convit_knn.jsonl``, to VISSL's ``metrics.json`` (as
``{"iteration", "train_phase_idx", "knn": {...}}``) and, with VISSL's
TensorBoard on, as ``knn/{student,teacher}/top1`` and ``top5`` at step
``iteration``. Training is untouched: every RNG state and train flag is
restored and nothing is read through the training data loader, so the weights
are those of a run without the hook. Auto-resume drops records later than the
resumed iteration, as the analysis hook does.

Labels: each image's class is read as VISSL reads a labelled split
(``LABEL_SOURCES`` = ``DATA_SOURCES``, ``LABEL_TYPE: standard``): for
``disk_folder`` the class folder, for filelists the label file. The memory
bank and queries must use the same classes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from classy_vision.generic.distributed_util import get_rank, get_world_size
from vissl.data import build_dataset
from vissl.utils.checkpoint import get_checkpoint_folder

from convit_ssl.checkpoints import run_folder
from convit_ssl.evaluation import knn_accuracy
from convit_ssl.files import read_json_lines
from convit_ssl.models.convit import ConViT
from convit_ssl.vissl.hooks.common import (
    BlockKeys,
    JsonLines,
    MonitorHook,
    eval_mode,
    is_primary,
    metrics_file,
    preserved_rng,
    read_block,
)
from convit_ssl.vissl.hooks.images import eval_transforms
from convit_ssl.vissl.model.trunk import find_convit, named_features, parse_feature_names, validate_trunk_config

CONFIG_BLOCK = "CONVIT_KNN"
RECORD_FILE = run_folder.KNN_RECORDS
TEACHER_ATTRIBUTES = {"dino_loss": "momentum_teacher", "moco_loss": "moco_encoder"}
_positive = (lambda v: v >= 1, "an integer >= 1")
CONFIG_KEYS: BlockKeys = {
    "USE": (False, bool, lambda v: True, "true or false"),
    "FREQUENCY_EPOCHS": (1, int, lambda v: v >= 0, "an integer >= 0"),
    "FREQUENCY_ITERS": (0, int, lambda v: v >= 0, "an integer >= 0 (0: use FREQUENCY_EPOCHS)"),
    "AT_START": (True, bool, lambda v: True, "true or false"),
    "FEATURE": ("lastCLS", str, lambda v: bool(v), "a trunk feature name such as lastCLS"),
    "TOPK": (20, int, *_positive),
    "TEMPERATURE": (0.07, float, lambda v: v > 0, "a number > 0"),
    "TEACHER": (False, bool, lambda v: True, "true or false"),
    "TRAIN_PATHS": ([], list, lambda v: all(isinstance(p, str) for p in v), "a list of folders"),
    "VAL_PATHS": ([], list, lambda v: all(isinstance(p, str) for p in v), "a list of folders"),
    "MAX_TRAIN_IMAGES": (10000, int, *_positive),
    "MAX_VAL_IMAGES": (5000, int, *_positive),
    "BATCH_SIZE": (256, int, *_positive),
}


@dataclass(frozen=True)
class KnnSettings:
    """A validated, switched-on ``HOOKS.CONVIT_KNN`` block."""

    frequency_epochs: int
    frequency_iters: int
    at_start: bool
    feature: str
    k: int
    temperature: float
    teacher: bool
    train_paths: tuple[str, ...]
    val_paths: tuple[str, ...]
    max_train_images: int
    max_val_images: int
    batch_size: int


def knn_settings(config: Any) -> KnnSettings | None:
    """The ``HOOKS.CONVIT_KNN`` block, validated; None when absent or ``USE: false``.
    Raises a ValueError naming the key for unknown keys, wrong values, a feature
    the trunk does not have, TEACHER without DINO or MoCo, or no split to read."""
    values = read_block(config, CONFIG_BLOCK, CONFIG_KEYS)
    if values is None:
        return None
    where = f"config.HOOKS.{CONFIG_BLOCK}"
    if values["FREQUENCY_EPOCHS"] == 0 and values["FREQUENCY_ITERS"] == 0 and not values["AT_START"]:
        raise ValueError(f"{where}: FREQUENCY_EPOCHS, FREQUENCY_ITERS and AT_START are all off; set one")
    try:
        parse_feature_names([values["FEATURE"]], validate_trunk_config(config.MODEL).depth)
    except ValueError as e:
        raise ValueError(f"{where}.FEATURE: {e}") from e
    if values["TEACHER"] and config.LOSS.name not in TEACHER_ATTRIBUTES:
        raise ValueError(
            f"{where}.TEACHER=true needs a loss with a momentum teacher "
            f"({', '.join(TEACHER_ATTRIBUTES)}), got config.LOSS.name={config.LOSS.name!r}"
        )
    for key, split in (("TRAIN_PATHS", "TRAIN"), ("VAL_PATHS", "TEST")):
        if not values[key] and not config.DATA[split].DATA_SOURCES:
            raise ValueError(
                f"{where}.{key} is empty and config.DATA.{split} has no data: "
                f"set {where}.{key}=[<folder with one sub-folder per class>]"
            )
    return KnnSettings(
        frequency_epochs=values["FREQUENCY_EPOCHS"],
        frequency_iters=values["FREQUENCY_ITERS"],
        at_start=values["AT_START"],
        feature=values["FEATURE"],
        k=values["TOPK"],
        temperature=values["TEMPERATURE"],
        teacher=values["TEACHER"],
        train_paths=tuple(values["TRAIN_PATHS"]),
        val_paths=tuple(values["VAL_PATHS"]),
        max_train_images=values["MAX_TRAIN_IMAGES"],
        max_val_images=values["MAX_VAL_IMAGES"],
        batch_size=values["BATCH_SIZE"],
    )


def record_frequency(num_epochs: int) -> int:
    """Epochs between kNN records for a run of `num_epochs`: the largest divisor of it up
    to a fifth of it, so that about five records trace the run and the last one is its end."""
    return max(d for d in range(1, max(1, num_epochs // 5) + 1) if num_epochs % d == 0)


def read_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The monitor's records of a run, in order (its checkpoint folder's RECORD_FILE)."""
    return read_json_lines(os.path.join(folder, RECORD_FILE)).records


# ------------------------------------------------------------------ the data
def labelled_split_config(config: Any, split: str, paths: tuple[str, ...], image_size: tuple[int, int]) -> Any:
    """A copy of `config` whose DATA.`split` reads labelled images without
    randomness: `paths` as disk_folder image folders when given, else the
    split's own sources with their labels; eval transforms; no DATA_LIMIT."""
    local = copy.deepcopy(config)
    block = local.DATA[split]
    if paths:
        block.DATA_SOURCES = ["disk_folder"] * len(paths)
        block.DATASET_NAMES = [f"knn_{split.lower()}_{i}" for i in range(len(paths))]
        block.DATA_PATHS = list(paths)
        block.LABEL_PATHS = list(paths)
    elif block.DATA_PATHS and not block.LABEL_PATHS and all(s == "disk_folder" for s in block.DATA_SOURCES):
        block.LABEL_PATHS = list(block.DATA_PATHS)  # a self-supervised run names only the image folders
    block.LABEL_SOURCES = list(block.DATA_SOURCES)
    block.LABEL_TYPE = "standard"
    block.DATA_LIMIT = -1
    block.TRANSFORMS = eval_transforms(config, split, image_size)
    return local


class LabelledImages:
    """The images and class labels of one split, read by VISSL's own data sources;
    `indices` is an evenly strided subset of at most `limit` images."""

    def __init__(
        self, config: Any, split: str, paths: tuple[str, ...], limit: int, image_size: tuple[int, int]
    ) -> None:
        self.where = (
            f"HOOKS.{CONFIG_BLOCK}: {'the memory bank' if split == 'TRAIN' else 'the queries'} "
            f"({', '.join(paths) if paths else f'config.DATA.{split}'})"
        )
        try:
            self.dataset = build_dataset(labelled_split_config(config, split, paths, image_size), split)
            total = len(self.dataset)
        except Exception as e:
            raise RuntimeError(f"{self.where}: could not be read ({type(e).__name__}: {e})") from e
        if total == 0:
            raise RuntimeError(f"{self.where}: no images")
        self.indices = (
            np.linspace(0, total - 1, min(limit, total)).round().astype(np.int64) if total > limit else np.arange(total)
        )

    def __len__(self) -> int:
        return len(self.indices)

    def shard(self, rank: int, world: int) -> np.ndarray:
        return self.indices[rank::world]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(i)] for i in indices]
        bad = [int(i) for i, item in zip(indices, items) if item["data_valid"][0] != 1]
        if bad:
            raise RuntimeError(f"{self.where}: images {bad[:5]} could not be read")
        images = torch.stack([item["data"][0] for item in items])
        labels = torch.tensor([int(np.asarray(item["label"][0]).reshape(-1)[0]) for item in items])
        return images, labels


# -------------------------------------------------------------- the numbers
def extract_features(
    model: ConViT, data: LabelledImages, indices: np.ndarray, feature: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features of `feature` for `indices` (float32, on the CPU) and their (N,) labels."""
    device = model.patch_embed.proj.weight.device
    features, labels = [], []
    with eval_mode(model):
        for start in range(0, len(indices), batch_size):
            images, targets = data.batch(indices[start : start + batch_size])
            out = named_features(model, images.to(device), [feature])[0]
            features.append(out.reshape(len(images), -1).float().cpu())
            labels.append(targets)
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def gather_features(
    indices: np.ndarray, features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's shard, ordered by image index (the 1-process order); on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        order = np.argsort(indices, kind="stable")
        return features[order], labels[order]
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (indices, features.numpy(), labels.numpy()))
    all_indices = np.concatenate([s[0] for s in shards])
    order = np.argsort(all_indices, kind="stable")
    all_features = np.concatenate([s[1] for s in shards if len(s[0])])[order]
    all_labels = np.concatenate([s[2] for s in shards])[order]
    return torch.from_numpy(all_features), torch.from_numpy(all_labels)


# ------------------------------------------------------------------ the hook
class ConViTKnnHook(MonitorHook):
    """Logs the online kNN top-1 / top-5 of the trunk (and teacher) being trained
    (module docstring). Every rank extracts its shard; rank 0 classifies and logs."""

    def __init__(self, settings: KnnSettings, output_path: str, metrics_path: str, tb_writer: Any = None) -> None:
        super().__init__(output_path, "ConViT kNN", tb_writer, settings.frequency_iters, settings.frequency_epochs)
        self.settings = settings
        self.metrics = JsonLines(metrics_path, run_folder.METRICS)
        self.bank: LabelledImages | None = None
        self.queries: LabelledImages | None = None

    def on_start(self, task: Any) -> None:
        model = find_convit(task.base_model, f"HOOKS.{CONFIG_BLOCK}")
        s = self.settings
        self.bank = LabelledImages(task.config, "TRAIN", s.train_paths, s.max_train_images, model.img_size)
        self.queries = LabelledImages(task.config, "TEST", s.val_paths, s.max_val_images, model.img_size)
        if is_primary():
            self.records.drop_after(task.iteration)
            every = f"{s.frequency_iters} iterations" if s.frequency_iters else f"{s.frequency_epochs} epoch(s)"
            logging.info(
                "ConViT kNN: %s of %d memory-bank / %d query images, every %s, records in %s",
                s.feature,
                len(self.bank),
                len(self.queries),
                every,
                self.output_path,
            )
        if s.at_start and task.iteration == 0 and task.train:
            self._log(task)

    # ------------------------------------------------------------------
    def _networks(self, task: Any) -> dict[str, ConViT]:
        networks = {"student": find_convit(task.base_model, f"HOOKS.{CONFIG_BLOCK}")}
        if self.settings.teacher:
            teacher = getattr(task.loss, TEACHER_ATTRIBUTES[task.config.LOSS.name], None)
            if teacher is not None:  # DINO builds its teacher at the first forward
                networks["teacher"] = find_convit(teacher, f"HOOKS.{CONFIG_BLOCK}")
        return networks

    def measure(self, task: Any) -> dict[str, Any]:
        """Extract (every rank, its shard), gather, classify: ``{network: {"top1", "top5"}}``."""
        assert self.bank is not None and self.queries is not None, "on_start reads the splits"
        s = self.settings
        rank, world = get_rank(), get_world_size()
        results: dict[str, Any] = {}
        for name, model in self._networks(task).items():
            with preserved_rng(model.patch_embed.proj.weight.device):
                splits = []
                for data in (self.bank, self.queries):
                    shard = data.shard(rank, world)
                    features, labels = extract_features(model, data, shard, s.feature, s.batch_size)
                    splits.append(gather_features(shard, features, labels))
            (bank, bank_labels), (queries, query_labels) = splits
            results[name] = knn_accuracy(bank, bank_labels, queries, query_labels, k=s.k, temperature=s.temperature)
        return results

    def _log(self, task: Any) -> None:
        start = time.time()
        results = self.measure(task)
        if not is_primary():
            return
        s = self.settings
        record = {
            "iteration": int(task.iteration),
            "epoch": int(task.train_phase_idx),
            "feature": s.feature,
            "k": s.k,
            "temperature": s.temperature,
            "num_train": len(self.bank),
            "num_val": len(self.queries),
            "seconds": round(time.time() - start, 3),
            **results,
        }
        self.metrics.append({"iteration": record["iteration"], "train_phase_idx": record["epoch"], "knn": results})
        logging.info(
            "ConViT kNN at iteration %d: %s",
            record["iteration"],
            ", ".join(f"{n} top-1 {r['top1']:.2f}%" for n, r in results.items()),
        )
        self.write(
            record,
            {f"knn/{name}/{metric}": value for name, numbers in results.items() for metric, value in numbers.items()},
        )


def build_hook(config: Any, tb_writer: Any = None) -> ConViTKnnHook | None:
    """The hook for `config`, or None when ``HOOKS.CONVIT_KNN`` is off."""
    settings = knn_settings(config)
    if settings is None:
        return None
    return ConViTKnnHook(
        settings, os.path.join(get_checkpoint_folder(config), RECORD_FILE), metrics_file(config), tb_writer
    )
