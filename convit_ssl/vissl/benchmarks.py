"""VISSL's extraction-based benchmarks, on the CPU as on GPUs.

Each benchmark composes a VISSL config, checks it (`validate`), extracts the
features it names with VISSL's ``extract_features`` engine (every rank writes
its shard: ``rank{r}_chunk{c}_{split}_{feature}_{features|targets|inds}.npy``
in ``EXTRACT_FEATURES.OUTPUT_DIR``, else the checkpoint folder), merges them
with VISSL's own loader, and evaluates:

- `nearest_neighbor`: weighted kNN (``NEAREST_NEIGHBOR.TOPK``, ``SIGMA`` = the
  temperature, ``L2_NORM_FEATS``) of TEST against TRAIN, the rule of VISSL's
  ``tools/nearest_neighbor_test.py`` computed by `convit_ssl.evaluation.knn`
  (VISSL's script needs CUDA and loops forever on fewer than 100 test images);
- `svm`: one linear SVM per class and feature with cross-validated cost,
  VISSL's ``SVMTrainer`` (VOC07 protocol: labels are N x classes of
  1 / 0 / -1 = positive / negative / ignored; the metric is the mean test AP);
- `low_shot`: VISSL's low-shot SVMs (``SVMLowShotTrainer``) on k positives per
  class, for every ``SVM.low_shot.k_values`` and independent sample in
  ``sample_inds``: ``dataset_name: voc`` samples labels of the extracted
  trainval features; ``places205`` samples k images per class of the TRAIN
  filelist and extracts each sample. (VISSL's own
  ``tools/train_svm_low_shot.py`` calls its VOC sampler with a missing
  argument, extra_scripts/create_low_shot_samples.py:125, and cannot run.)

Results are logged and written to ``<checkpoint folder>/{knn,svm,low_shot}_results.json``.
Multi-node: every node runs the same command with its ``node_id``; the
features land on the shared checkpoint folder and node 0 evaluates.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vissl.data.dataset_catalog import get_data_files
from vissl.models.model_helpers import get_trunk_output_feature_names
from vissl.utils.checkpoint import get_checkpoint_folder
from vissl.utils.extract_features_utils import ExtractedFeaturesLoader

from convit_ssl.evaluation import knn_accuracy
from convit_ssl.files import atomic_write_text
from convit_ssl.vissl.compat.patches import low_shot_trainer
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.model.weights_init import prepare_weights_init
from convit_ssl.vissl.run import output_folder, torchrun
from convit_ssl.vissl.run.launcher import launch_local
from convit_ssl.vissl.run.validate import validate

LOG = logging.getLogger(__name__)


def feature_names(config: Any) -> list[str]:
    """The features the extraction writes: the trunk features of
    LINEAR_EVAL_FEAT_POOL_OPS_MAP, else ``heads`` (the model's output), as VISSL names them."""
    return get_trunk_output_feature_names(config.MODEL) or ["heads"]


def features_folder(config: Any) -> str:
    return config.EXTRACT_FEATURES.OUTPUT_DIR or get_checkpoint_folder(config)


def _check_benchmark_config(config: Any) -> None:
    if not config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON:
        raise ValueError(
            "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON must be true for a feature benchmark "
            "(the trunk is evaluated frozen)"
        )
    if not (config.TEST_MODEL or config.TEST_ONLY) or not config.DATA.TEST.DATA_SOURCES:
        raise ValueError("a feature benchmark needs a TEST split: set config.TEST_MODEL=true and config.DATA.TEST")


def extract(config: Any, node_id: int = 0) -> str:
    """Validate `config`, then run VISSL's ``extract_features`` engine on it (all
    ranks of this node); return the folder that holds the features."""
    validate(config)
    prepare_weights_init(config)
    launch_local(config, node_id, "extract_features")
    return features_folder(config)


def load_features(folder: str, split: str, feature: str) -> dict[str, np.ndarray]:
    """VISSL's merged shards of one split and feature: ``{"features", "targets", "inds"}``, ordered by index."""
    merged = ExtractedFeaturesLoader.load_features(folder, split.lower(), feature)
    order = np.argsort(merged["inds"], kind="stable")
    return {key: np.asarray(merged[key])[order] for key in ("features", "targets", "inds")}


def _device(config: Any) -> torch.device:
    return torch.device("cuda" if config.MACHINE.DEVICE == "gpu" and torch.cuda.is_available() else "cpu")


def _write_results(config: Any, name: str, results: dict[str, Any]) -> str:
    path = os.path.join(get_checkpoint_folder(config), f"{name}_results.json")
    atomic_write_text(path, json.dumps(results, indent=2, allow_nan=False) + "\n")
    LOG.info("%s results: %s -> %s", name, json.dumps(results), path)
    return path


# --------------------------------------------------------------------- kNN
def knn_from_folder(config: Any, folder: str) -> dict[str, Any]:
    """kNN top-1 / top-5 (percent) of every extracted feature, TEST against TRAIN."""
    settings = config.NEAREST_NEIGHBOR
    device = _device(config)
    results: dict[str, Any] = {
        "k": int(settings.TOPK),
        "temperature": float(settings.SIGMA),
        "l2_normalized": bool(settings.L2_NORM_FEATS),
        "features": {},
    }
    for feature in feature_names(config):
        train, test = load_features(folder, "train", feature), load_features(folder, "test", feature)
        if train["targets"].shape[1:] not in ((), (1,)) or test["targets"].shape[1:] not in ((), (1,)):
            raise ValueError(
                f"kNN needs one class index per image; {feature} targets have shape "
                f"{train['targets'].shape[1:]} (multi-label data: use the svm benchmark)"
            )
        accuracy = knn_accuracy(
            torch.from_numpy(train["features"].reshape(len(train["features"]), -1)).to(device),
            torch.from_numpy(train["targets"].reshape(-1)),
            torch.from_numpy(test["features"].reshape(len(test["features"]), -1)),
            torch.from_numpy(test["targets"].reshape(-1)),
            k=int(settings.TOPK),
            temperature=float(settings.SIGMA),
            normalize=bool(settings.L2_NORM_FEATS),
        )
        results["features"][feature] = {**accuracy, "num_train": len(train["inds"]), "num_test": len(test["inds"])}
    return results


def nearest_neighbor(config: Any, node_id: int = 0) -> dict[str, Any]:
    """Extract, then kNN-classify TEST with TRAIN as the memory bank (see the module docstring)."""
    _check_benchmark_config(config)
    folder = extract(config, node_id)
    if node_id != 0:
        return {}
    results = knn_from_folder(config, folder)
    _write_results(config, "knn", results)
    return results


# -------------------------------------------------------------------- SVMs
def _multi_label(targets: np.ndarray, feature: str, split: str) -> None:
    if targets.ndim != 2 or targets.shape[1] < 2:
        raise ValueError(
            f"the SVM benchmark needs N x classes labels of 1 / 0 / -1 (VOC07 layout); "
            f"{split} {feature} targets have shape {targets.shape}"
        )


def svm(config: Any, node_id: int = 0) -> dict[str, Any]:
    """Extract, then train and test VISSL's per-class linear SVMs on every feature; mAP in percent."""
    # start-up: loads scikit-learn and SciPy (1.3 s), only for the SVM benchmark
    from vissl.utils.svm_utils.svm_trainer import SVMTrainer

    _check_benchmark_config(config)
    folder = extract(config, node_id)
    if node_id != 0:
        return {}
    results: dict[str, Any] = {"features": {}}
    for feature in feature_names(config):
        train, test = load_features(folder, "train", feature), load_features(folder, "test", feature)
        _multi_label(train["targets"], feature, "train")
        _multi_label(test["targets"], feature, "test")
        trainer = SVMTrainer(config.SVM, layer=feature, output_dir=get_checkpoint_folder(config))
        trainer.train(train["features"], train["targets"])
        trainer.test(test["features"], test["targets"])
        ap = np.load(os.path.join(trainer.output_dir, "test_ap.npy")).reshape(-1)
        results["features"][feature] = {
            "mAP": round(float(ap.mean()) * 100, 4),
            "ap_per_class": [round(float(a) * 100, 4) for a in ap],
            "costs": [float(c) for c in trainer.get_best_cost_value()],
        }
    _write_results(config, "svm", results)
    return results


# --------------------------------------------------------------- low-shot
def _low_shot_results(trainer: Any, k_values: Sequence[int], samples: Sequence[int]) -> dict[str, Any]:
    """VISSL's aggregate (the best cost per k: mean / min / max / std test mAP over the samples, percent)."""
    out = trainer.aggregate_stats(list(k_values), list(samples))
    return {key: {stat: float(value) for stat, value in stats.items()} for key, stats in out.items()}


def low_shot(config: Any, node_id: int = 0) -> dict[str, Any]:
    """Low-shot SVMs as VISSL lays them out (``SVM.low_shot.dataset_name`` voc or places205)."""
    # optional: VISSL's extra_scripts (its source tree), only for the low-shot benchmark
    from extra_scripts.create_low_shot_samples import (
        generate_places_low_shot_samples,
        generate_voc07_low_shot_samples,
    )

    SVMLowShotTrainer = low_shot_trainer()
    _check_benchmark_config(config)
    settings = config.SVM.low_shot
    k_values, samples = [int(k) for k in settings.k_values], [int(s) for s in settings.sample_inds]
    output_dir = get_checkpoint_folder(config)
    random.seed(config.SEED_VALUE)  # the samplers draw with Python's random
    results: dict[str, Any] = {
        "dataset_name": settings.dataset_name,
        "k_values": k_values,
        "sample_inds": samples,
        "features": {},
    }
    if settings.dataset_name == "voc":
        folder = extract(config, node_id)
        if node_id != 0:
            return {}
        for feature in feature_names(config):
            train, test = load_features(folder, "train", feature), load_features(folder, "test", feature)
            _multi_label(train["targets"], feature, "train")
            generate_voc07_low_shot_samples(train["targets"], k_values, samples, output_dir, feature)
            trainer = SVMLowShotTrainer(config.SVM, layer=feature, output_dir=output_dir)
            for sample in samples:
                for k in k_values:
                    targets = np.load(f"{output_dir}/{feature}_sample{sample}_k{k}.npy")
                    trainer.train(train["features"], targets, sample, k)
                    trainer.test(test["features"], test["targets"], sample, k)
            results["features"][feature] = _low_shot_results(trainer, k_values, samples)
    elif "places" in settings.dataset_name:
        results["features"] = _places_low_shot(
            config, node_id, k_values, samples, output_dir, generate_places_low_shot_samples, SVMLowShotTrainer
        )
        if node_id != 0:
            return {}
    else:
        raise ValueError(
            f"config.SVM.low_shot.dataset_name must be 'voc' or 'places205'; got {settings.dataset_name!r}"
        )
    _write_results(config, "low_shot", results)
    return results


def _places_low_shot(config, node_id, k_values, samples, output_dir, sampler, trainer_class) -> dict[str, Any]:
    """Places205 layout: sample k images per class from the TRAIN filelist, extract each sample's features
    (and TEST's once), then train and test one low-shot SVM set per sample and k."""
    data_paths, label_paths = get_data_files(split="TRAIN", dataset_config=config.DATA)
    targets = np.load(label_paths[0], allow_pickle=True).reshape(-1)
    sampler(targets, k_values, samples, output_dir, data_paths[0])
    test_folder = None
    for sample in samples:
        for k in k_values:
            local = copy.deepcopy(config)
            local.DATA.TRAIN.DATA_PATHS = [f"{output_dir}/train_images_sample{sample}_k{k}.npy"]
            local.DATA.TRAIN.LABEL_PATHS = [f"{output_dir}/train_labels_sample{sample}_k{k}.npy"]
            local.CHECKPOINT.DIR = f"{output_dir}/sample{sample}_k{k}"
            local.EXTRACT_FEATURES.OUTPUT_DIR = ""
            if test_folder is not None:  # TEST's features are the same for every sample: extracted once
                local.TEST_MODEL = False
            folder = extract(local, node_id)
            test_folder = test_folder or folder
    if node_id != 0:
        return {}
    out: dict[str, Any] = {}
    for feature in feature_names(config):
        test = load_features(test_folder, "test", feature)
        trainer = trainer_class(config.SVM, layer=feature, output_dir=output_dir)
        for sample in samples:
            for k in k_values:
                train = load_features(f"{output_dir}/sample{sample}_k{k}", "train", feature)
                trainer.train(train["features"], train["targets"], sample, k)
                trainer.test(test["features"], test["targets"], sample, k)
        out[feature] = _low_shot_results(trainer, k_values, samples)
    return out


RUNNERS: dict[str, Callable[[Any, int], dict[str, Any]]] = {
    "knn": nearest_neighbor,
    "svm": svm,
    "low_shot": low_shot,
}


def prepare(benchmark: str, overrides: Sequence[str]) -> tuple[Callable[[Any, int], dict[str, Any]], Any, int]:
    """Compose `overrides` (``config=NAME`` plus Hydra overrides, ``node_id=K``) for
    `benchmark` and check the config; returns (runner, config, node_id). Every
    user error (unknown benchmark, config, data path) is raised here, before any work."""
    if benchmark not in RUNNERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(RUNNERS)}")
    if torchrun.started_by_torchrun():
        raise ValueError(
            "the feature benchmarks run under VISSL's launcher (config.DISTRIBUTED.NUM_PROC_PER_NODE), not under "
            "torchrun: start the command without torchrun"
        )
    args, config = compose(overrides)
    _check_benchmark_config(config)
    validate(config)
    output_folder.check_writable(output_folder.output_folder(config), "config.CHECKPOINT.DIR")
    if config.EXTRACT_FEATURES.OUTPUT_DIR:
        output_folder.check_writable(config.EXTRACT_FEATURES.OUTPUT_DIR, "config.EXTRACT_FEATURES.OUTPUT_DIR")
    return RUNNERS[benchmark], config, int(args.node_id)


def summary_lines(benchmark: str, results: Mapping[str, Any]) -> list[str]:
    """One line per feature: the benchmark's headline numbers."""
    lines = []
    for feature, numbers in results.get("features", {}).items():
        if benchmark == "knn":
            lines.append(
                f"{feature}: kNN top-1 {numbers['top1']:.2f}%, top-5 {numbers['top5']:.2f}% "
                f"(k={results['k']}, T={results['temperature']}, {numbers['num_train']} train / "
                f"{numbers['num_test']} test)"
            )
        elif benchmark == "svm":
            lines.append(f"{feature}: SVM test mAP {numbers['mAP']:.2f}%")
        else:
            lines.append(
                f"{feature}: low-shot SVM test mAP "
                + ", ".join(f"{k} {stats['mean']:.2f} +- {stats['std']:.2f}%" for k, stats in numbers.items())
            )
    return lines
