"""A VISSL run folder (``CHECKPOINT.DIR``) read without VISSL: its final
checkpoint by phase number, the training losses VISSL logs to ``stdout.json``
and the accuracy meters of ``metrics.json``. The one reader the commands, the
tools and the tests use.

Layout (VISSL 0.1.6, vissl/utils/checkpoint.py and hooks/log_hooks.py)::

    model_phase{N}.torch                 every CHECKPOINT_FREQUENCY phases
    model_final_checkpoint_phase{N}.torch  at the end of the run (N = last phase)
    model_iteration{N}.torch             every CHECKPOINT_ITER_FREQUENCY iterations, and at a stop
    checkpoint.torch                     a link to the latest of them
    stdout.json                          one JSON record per logged iteration ({"loss": ...})
    metrics.json                         one JSON record per phase ({"train_accuracy_list_meter": ...}), and
                                         convit_ssl's kNN and unreadable-image records
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convit_ssl.files import read_json_lines

# Every file a VISSL run writes that convit_ssl reads or adds: the one place they are spelled.
CHECKPOINT_LINK = "checkpoint.torch"  # VISSL: a link to the latest checkpoint
STDOUT = "stdout.json"  # VISSL: one record per logged iteration
METRICS = "metrics.json"  # VISSL: one record per phase (and convit_ssl's kNN and unreadable-image records)
LOG = "log.txt"  # VISSL: the run's log
TRAIN_CONFIG = "train_config.yaml"  # VISSL: the composed config
KNN_RECORDS = "convit_knn.jsonl"  # convit_ssl.vissl.hooks.knn
ANALYSIS_RECORDS = "convit_analysis.jsonl"  # convit_ssl.vissl.hooks.analysis
FINAL_PATTERN = "model_final_checkpoint_phase*.torch"
CHECKPOINT_PATTERN = "model_*.torch"  # every checkpoint VISSL writes
_PHASE = re.compile(r"phase(\d+)\.torch$")


def phase_of(checkpoint: os.PathLike) -> int:
    """The phase number of a ``model_[final_checkpoint_]phase{N}.torch`` file."""
    match = _PHASE.search(Path(checkpoint).name)
    if match is None:
        raise ValueError(
            f"{checkpoint}: not a VISSL phase checkpoint (model_phase<N>.torch or "
            "model_final_checkpoint_phase<N>.torch)"
        )
    return int(match.group(1))


def final_checkpoint(folder: os.PathLike) -> Path | None:
    """The run's final checkpoint, the one of the highest phase (phase14 after phase9),
    or None if the run wrote none."""
    found = sorted(Path(folder).glob(FINAL_PATTERN), key=phase_of)
    return found[-1] if found else None


def checkpoints(folder: os.PathLike) -> list[Path]:
    """Every checkpoint in the folder (phase, iteration and final ones), by name."""
    return sorted(Path(folder).glob(CHECKPOINT_PATTERN))


def require_final_checkpoint(folder: os.PathLike) -> Path:
    """`final_checkpoint`, or FileNotFoundError naming the folder and its log."""
    final = final_checkpoint(folder)
    if final is None:
        raise FileNotFoundError(f"no final checkpoint ({FINAL_PATTERN}) in {folder}; see {Path(folder) / LOG}")
    return final


def _records(path: Path) -> list[dict]:
    return read_json_lines(path).records


def losses(folder: os.PathLike) -> list[float]:
    """The training losses VISSL logged, in order (empty if it logged none)."""
    path = Path(folder) / STDOUT
    if not path.is_file():
        return []
    return [float(r["loss"]) for r in _records(path) if r.get("loss") is not None]


def metrics(folder: os.PathLike) -> list[dict]:
    """Every record of the run's metrics.json, in order (VISSL's meters, convit_ssl's kNN and
    unreadable-image records)."""
    return _records(Path(folder) / METRICS)


def final_accuracies(folder: os.PathLike) -> dict[str, dict[str, float]]:
    """The last top-1 accuracy of each head in percent, per split: {"train": {head: %}, "test": {...}},
    from metrics.json (a split the run did not measure is absent)."""
    result: dict[str, dict[str, float]] = {}
    for record in metrics(folder):
        for split in ("train", "test"):
            meter = record.get(f"{split}_accuracy_list_meter")
            if meter:
                result[split] = {str(k): float(v) for k, v in meter["top_1"].items()}
    return result


def unreadable_images(folder: os.PathLike) -> list[dict[str, object]]:
    """The phases in which VISSL replaced unreadable images by grey ones (convit_ssl's count in
    metrics.json): [{"phase_idx", "train_phase_idx", "split", "unreadable", "images"}, ...]."""
    return [
        {"phase_idx": r["phase_idx"], "train_phase_idx": r["train_phase_idx"], **r["unreadable_images"]}
        for r in metrics(folder)
        if "unreadable_images" in r
    ]
