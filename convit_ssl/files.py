"""Files, the lowest layer: writing into place atomically, reading JSON lines, and which files are images."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

# torchvision.datasets.folder.IMG_EXTENSIONS: what VISSL's disk_folder (an
# ImageFolder) reads, so a folder that trains is a folder the analyses read.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; renamed onto `path` when
    the block ends, removed if it raises: readers see the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class JsonLinesRead:
    records: list  # the parsed values, in order
    line_numbers: list  # the line each came from (1-based)
    truncated_line: int | None  # the incomplete last line that was skipped, if any


def read_json_lines(path: PathLike) -> JsonLinesRead:
    """A JSON-lines file (one JSON value per line, blank lines ignored). A last
    line that does not parse and has no newline after it was cut by a killed
    writer: it is skipped with a warning and reported. Any other line that does
    not parse is a ValueError naming the file and the line."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records, numbers, truncated = [], [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            numbers.append(number)
        except json.JSONDecodeError as e:
            if number == len(lines):  # only the final piece can lack its newline
                truncated = number
                logging.getLogger(__name__).warning("%s: skipped the incomplete last line %d", path, number)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
    return JsonLinesRead(records, numbers, truncated)
