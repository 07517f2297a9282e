"""The folder a run writes, checked before anything is launched.

- `check_writable`: the folder can be created and written. VISSL would
  otherwise fail inside its ranks (``Please specify config.CHECKPOINT.DIR
  parameter``, or a traceback at the first checkpoint) on a read-only file
  system, a path through a file, or a folder the user may not write.
- `check_same_run`: a folder holding checkpoints belongs to the run being
  launched. With auto-resume a relaunch continues from them, so a run of
  another model or method launched into it would load weights of other shapes
  (or of another method's heads), and without auto-resume it would overwrite
  them. The run's identity is what a checkpoint fixes: the trunk (its dropout
  and drop-path rates aside), the heads, the loss and the task, compared with
  the train_config.yaml the folder's run wrote.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from convit_ssl.checkpoints import run_folder

IDENTITY = ("MODEL.TRUNK", "MODEL.HEAD.PARAMS", "LOSS.name", "TRAINER.TASK_NAME")
SHOWN = 3  # differences named in the message


def output_folder(config: Any) -> str:
    """VISSL's checkpoint folder of the run (CHECKPOINT.DIR, plus the run id where
    VISSL appends it), without creating it."""
    folder = config.CHECKPOINT.DIR
    if config.DISTRIBUTED.NUM_NODES > 1 and config.CHECKPOINT.APPEND_DISTR_RUN_ID:
        folder = f"{folder}/{config.DISTRIBUTED.RUN_ID}"
    return str(folder)


def check_writable(folder: str, key: str) -> None:
    """Create `folder` if missing and write a probe file in it; ValueError in one line if either fails."""
    if "://" in folder:  # remote storage (iopath): no local check
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".convit_ssl_write_probe_"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(
            f"{key}={folder} cannot be written ({reason}): expected a folder this user can create and write"
        ) from None


def _flat(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key in sorted(value):
            if "DROP" not in str(key).upper():  # dropout and drop-path rates train, they do not shape
                yield from _flat(value[key], f"{prefix}.{key}")
    else:
        yield prefix, value


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in IDENTITY:
        value: Any = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        found.update(_flat(_plain(value), path))
    return found


def _plain(value: Any) -> Any:
    """AttrDicts and lists as YAML reads them back (tuples as lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_same_run(config: Any) -> None:
    """ValueError in one line when the run folder holds checkpoints of another run."""
    folder = output_folder(config)
    saved_config = os.path.join(folder, run_folder.TRAIN_CONFIG)
    if not run_folder.checkpoints(folder) or not os.path.isfile(saved_config):
        return
    with open(saved_config, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    there, here = _identity(saved), _identity(config)
    differences = [key for key in sorted(there.keys() | here.keys()) if there.get(key) != here.get(key)]
    if not differences:
        return
    shown = "; ".join(f"{key}: {there.get(key)!r} there, {here.get(key)!r} here" for key in differences[:SHOWN])
    more = f" (and {len(differences) - SHOWN} more)" if len(differences) > SHOWN else ""
    raise ValueError(
        f"config.CHECKPOINT.DIR={folder} holds the checkpoints of another run ({shown}{more}): relaunching there "
        "would resume from them or overwrite them; choose another folder, or empty this one to start over"
    )


def check(config: Any) -> None:
    """Both checks of the run folder (CHECKPOINT.DIR)."""
    check_writable(output_folder(config), "config.CHECKPOINT.DIR")
    check_same_run(config)
