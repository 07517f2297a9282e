"""The training log of the VISSL analysis hook (`convit_analysis.jsonl`): its
schema, a record check, and a reader that survives a run killed mid-line.

Training log (`convit_analysis.jsonl`, one JSON object per line, written by
the VISSL analysis hook)::

    {"iteration": int, "epoch": int, "num_images": int, "grid": [H, W],
     "layers": [{"index": i, "kind": "gpsa" | "mhsa",
                 "gate": [per head],                                   # GPSA only
                 "nonlocality": {"combined": [per head],
                                 "positional": [...], "content": [...]}}]}   # the last two GPSA only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convit_ssl.analysis.collect import GPSA_KIND, MHSA_KIND
from convit_ssl.files import PathLike, read_json_lines


@dataclass
class TrainingLog:
    """Records of a training log, in file order; `truncated_line` is the number
    of an incomplete last line that was skipped (a run killed while writing)."""

    path: Path
    records: list[dict[str, Any]]
    truncated_line: int | None = None


def _check_numbers(values: Any, where: str) -> None:
    if (
        not isinstance(values, list)
        or not values
        or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
    ):
        raise ValueError(f"{where}: expected a non-empty list of numbers (per head), got {values!r}"[:300])


def check_record(record: Any) -> dict[str, Any]:
    """A training-log record with the fields the curves need, or a ValueError naming the bad field."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    iteration = record.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise ValueError(f"'iteration' must be an integer, got {iteration!r}")
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("'layers' must be a non-empty list")
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{where}: expected an object, got {type(layer).__name__}")
        if not isinstance(layer.get("index"), int) or isinstance(layer.get("index"), bool):
            raise ValueError(f"{where}.index must be an integer, got {layer.get('index')!r}")
        if layer.get("kind") not in (GPSA_KIND, MHSA_KIND):
            raise ValueError(f"{where}.kind must be 'gpsa' or 'mhsa', got {layer.get('kind')!r}")
        if layer["kind"] == GPSA_KIND:
            _check_numbers(layer.get("gate"), f"{where}.gate")
        nonloc = layer.get("nonlocality")
        if not isinstance(nonloc, dict):
            raise ValueError(f"{where}.nonlocality must be an object with 'combined', got {nonloc!r}")
        _check_numbers(nonloc.get("combined"), f"{where}.nonlocality.combined")
    return record


def read_training_log(path: PathLike) -> TrainingLog:
    """Read a JSON-lines training log. An incomplete last line (no newline at
    the end and not valid JSON: the writer was killed) is skipped and reported
    in `truncated_line`; any other bad line is a ValueError naming the file and
    line number. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"training log {str(path)!r} does not exist"
            if not path.exists()
            else f"training log {str(path)!r} is not a file"
        )
    read = read_json_lines(path)
    records, truncated = [], read.truncated_line
    for number, record in zip(read.line_numbers, read.records):
        try:
            records.append(check_record(record))
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: {e}") from e
    if not records:
        raise ValueError(f"{path}: no records" + (f" (line {truncated} is incomplete)" if truncated else ""))
    return TrainingLog(path, records, truncated)
