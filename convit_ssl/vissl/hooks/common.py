"""What convit_ssl's VISSL hooks share: their config blocks, RNG isolation,
rank checks, their JSON-lines record files, and the monitors' skeleton
(`MonitorHook`: when to measure, where the records go)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from classy_vision.generic.distributed_util import is_primary as primary
from classy_vision.hooks.classy_hook import ClassyHook
from torch import nn
from vissl.utils.checkpoint import get_checkpoint_folder

from convit_ssl.analysis.collect import evaluating
from convit_ssl.checkpoints import run_folder
from convit_ssl.files import atomic_write_text
from convit_ssl.vissl.compat import rng
from convit_ssl.vissl.model.trunk import TRUNK_NAME

# config key -> (default, accepted type, condition, what the condition says)
BlockKeys = dict[str, tuple[Any, type, Callable[[Any], bool], str]]


def read_block(config: Any, name: str, keys: BlockKeys) -> dict[str, Any] | None:
    """The ``HOOKS.<name>`` block of a VISSL config with defaults filled in and
    every value checked; None when absent or ``USE: false``. Unknown keys and
    wrong types or values raise a ValueError naming the key. Every block has ``USE``."""
    where = f"config.HOOKS.{name}"
    block = config.HOOKS.get(name)
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(keys)}, got {block!r}")
    unknown = sorted(set(block) - set(keys))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid: {', '.join(keys)}")
    values = {}
    for key, (default, kind, ok, expected) in keys.items():
        value = block.get(key, default)
        if kind is float and type(value) is int:
            value = float(value)
        if kind is list and value is not None and not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}.{key} must be {expected}, got {value!r}")
        # bool is an int subclass: refuse USE=1 and FREQUENCY_ITERS=true alike
        if (type(value) is not kind and kind is not list) or not ok(value):
            raise ValueError(f"{where}.{key} must be {expected}, got {value!r}")
        values[key] = list(value) if kind is list else value
    if not values["USE"]:
        return None
    if config.MODEL.TRUNK.NAME != TRUNK_NAME:
        raise ValueError(
            f"{where}.USE=true needs config.MODEL.TRUNK.NAME={TRUNK_NAME}, got {config.MODEL.TRUNK.NAME!r}"
        )
    return values


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and `device`'s CUDA) RNG states
    after the block, so that a measurement leaves training's random streams as they were."""
    state = rng.rank_state(device)
    try:
        yield
    finally:
        rng.set_rank_state(state, device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode under no_grad; every submodule's train flag is restored after."""
    with evaluating(model), torch.no_grad():
        yield model


def is_primary() -> bool:
    return primary()


def metrics_file(config: Any) -> str:
    """VISSL's metrics.json of a run (one JSON object per line, in its checkpoint folder)."""
    return os.path.join(get_checkpoint_folder(config), run_folder.METRICS)


class JsonLines:
    """A JSON-lines record file, one object per trigger, each with an ``iteration``."""

    def __init__(self, path: str, label: str) -> None:
        self.path = path
        self.label = label

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()

    def drop_after(self, iteration: int) -> None:
        """Keep only records up to `iteration` (the resumed one; 0 for a fresh run).
        A hook that runs before VISSL's checkpoint hook wrote every record at or
        before a checkpoint's iteration before that checkpoint, so after an
        auto-resume the file holds exactly one record per trigger."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill: it is rewritten after the resume
                logging.warning("%s: dropping unreadable line %d of %s", self.label, number, self.path)
                continue
            if record.get("iteration", iteration + 1) <= iteration:
                kept.append(line)
        if len(kept) == len(lines):
            return
        logging.info(
            "%s: resuming at iteration %d, dropping %d later record(s) of %s",
            self.label,
            iteration,
            len(lines) - len(kept),
            self.path,
        )
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


class MonitorHook(ClassyHook):
    """The skeleton of the analysis and kNN monitors: measure (`_log`) after every
    `frequency_iters` training iterations, or, when that is 0, after every
    `frequency_epochs` training phases; `write` a record to the JSON-lines file
    and its scalars to VISSL's TensorBoard writer (rank 0). Nothing goes into
    `self.state`: VISSL checkpoints it."""

    on_phase_start = ClassyHook._noop

    def __init__(
        self, output_path: str, label: str, tb_writer: Any, frequency_iters: int, frequency_epochs: int
    ) -> None:
        super().__init__()
        self.output_path = output_path
        self.tb_writer = tb_writer
        self.records = JsonLines(output_path, label)
        self.frequency_iters = frequency_iters
        self.frequency_epochs = frequency_epochs

    def _log(self, task: Any) -> None:
        raise NotImplementedError

    def on_step(self, task: Any) -> None:
        if self.frequency_iters > 0 and task.train and task.iteration % self.frequency_iters == 0:
            self._log(task)

    def on_phase_end(self, task: Any) -> None:
        every = self.frequency_epochs
        if self.frequency_iters == 0 and every > 0 and task.train and (task.train_phase_idx + 1) % every == 0:
            self._log(task)

    def on_end(self, task: Any) -> None:
        if self.tb_writer is not None and is_primary():
            self.tb_writer.flush()

    def write(self, record: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
        """Append `record` (with its ``iteration``) and put `scalars` (tag -> value) at that step."""
        self.records.append(record)
        if self.tb_writer is not None:
            for tag, value in scalars.items():
                self.tb_writer.add_scalar(tag, value, global_step=record["iteration"])
            self.tb_writer.flush()
