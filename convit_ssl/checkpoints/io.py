"""Safe loading and atomic saving of checkpoint files.

Loading never executes pickled code (`torch.load(weights_only=True)`); the
only classes allowed beyond tensors, containers, numbers and strings are
`SAFE_GLOBALS`. Every failure says what was found and what was expected. Saving writes a temporary
file in the target folder and renames it into place, so an interrupted or
failed save leaves nothing half-written, and an existing file is replaced
only when asked.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from convit_ssl.files import PathLike, atomic_path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


class CheckpointError(ValueError):
    """A checkpoint file or dict that cannot be used as asked."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (the disk full, an I/O error); the
    file it would have replaced, if any, is untouched and no partial file is left."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE_BYTES = 1 << 20  # free space under which a failed write is taken for a full disk


def _free_bytes(folder: Path) -> int | None:
    try:
        usage = os.statvfs(folder)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def _disk_full(folder: Path) -> bool:
    """Whether the file system is full: torch.save's C++ writer reports a full disk
    as a RuntimeError without an errno ("file write failed", "unexpected pos ...");
    read while the partial file still holds what did fit."""
    free = _free_bytes(folder)
    return free is not None and free < _LOW_SPACE_BYTES


def _write_failure(path: Path, partial: Path, error: BaseException) -> CheckpointWriteError:
    """What went wrong, in one line."""
    code = getattr(error, "errno", None)
    if code in _NO_SPACE or _disk_full(path.parent):
        written = partial.stat().st_size if partial.exists() else 0
        reason = f"no space left on device ({written} bytes written, {_free_bytes(path.parent)} bytes free)"
        code = errno.ENOSPC
    else:
        reason = _first_line(error)
    return CheckpointWriteError(code or errno.EIO, f"writing {path} failed: {reason}; nothing was replaced")


# Harmless classes that checkpoints people hold contain. The official ConViT (and
# DeiT) main.py saves {"model", "optimizer", "lr_scheduler", "epoch", "model_ema",
# "scaler", "args"}: all state dicts of tensors, numbers and strings, except
# `args`, its argparse.Namespace (which unpickles to attributes and runs no code).
SAFE_GLOBALS = (argparse.Namespace,)


def load_checkpoint(path: PathLike) -> Any:
    """`torch.load(path)` on CPU with weights_only=True (plus `SAFE_GLOBALS`), with
    clear errors; a `.safetensors` file is read with safetensors."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} is a link to {os.readlink(path)!r}, which does not exist. VISSL's checkpoint.torch "
            "points at the run's latest checkpoint: give that file (model_phase*.torch or "
            "model_final_checkpoint_phase*.torch), or copy the folder with the files the link points at (cp -L)"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist"
            if not path.exists()
            else f"checkpoint {str(path)!r} is not a file"
        )
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    kind = _file_kind(path)
    if kind is not None:  # not a checkpoint at all: say what it is, before any unpickling
        raise CheckpointError(f"{str(path)!r} is not a torch checkpoint: {kind}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # a pickle, but not of objects: damaged, not unsafe
            raise CheckpointError(
                f"{str(path)!r} ({path.stat().st_size} bytes) is not a readable torch checkpoint (truncated or "
                f"corrupt?): {next((line.strip() for line in str(e).splitlines() if 'Unsupported' in line), _first_line(e))}"
            ) from e
        reason = _first_line(e)
        raise CheckpointError(
            f"refused to load {str(path)!r}: it holds pickled objects other than tensors, numbers, strings, "
            f"containers and {', '.join(c.__module__ + '.' + c.__qualname__ for c in SAFE_GLOBALS)} ({reason}). "
            "convit_ssl loads checkpoints with weights_only=True and never runs code from a file. Only if you "
            "trust its source: load it in your own code with torch.load(path, weights_only=False) and "
            "torch.save its model state dict"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{str(path)!r} ({size} bytes) is not a readable torch checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from e


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later (torch's legacy format)


def _file_kind(path: Path) -> str | None:
    """What a file that cannot be a torch checkpoint is (empty, text, other bytes),
    or None for a zip archive or a pickle, which torch.load has to judge."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"it is a text file (it begins {first!r})"
    return (
        f"its first bytes ({head[:8].hex(' ')}) are neither a zip archive (torch.save) nor a pickle "
        f"({path.stat().st_size} bytes)"
    )


def _load_safetensors(file: Path) -> Any:
    try:
        from safetensors.torch import load_file  # (an optional dependency: imported when needed)
    except ImportError as e:
        raise CheckpointError(f"reading {str(file)!r} needs the safetensors package (pip install safetensors)") from e
    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file: {e}") from e


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save to `path` through a temporary file in the same folder, flushed
    to disk, then renamed into place. torch.save is given a file name (its C++
    writer is several times faster than writing through a Python file object)."""
    path = Path(path)
    with atomic_path(path) as partial:
        try:
            torch.save(obj, str(partial))
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_failure(path, partial, e) from e
        except RuntimeError as e:  # torch's C++ writer: "file write failed", "unexpected pos", ...
            if not _disk_full(path.parent):
                raise  # not the disk: an object that cannot be saved, say
            raise _write_failure(path, partial, e) from e


def save_checkpoint(obj: Any, path: PathLike, overwrite: bool = False) -> Path:
    """Atomically save `obj` to `path`; refuse to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=true to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    atomic_torch_save(obj, path)
    return path
