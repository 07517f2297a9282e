"""The ranks' random-number states in VISSL's checkpoints (the patch
"random-number states carried in checkpoints"), so that a resumed run draws
what the uninterrupted run drew: its crops and flips (with 0 loader workers
they come from the rank's Python and torch generators; with workers, from
seeds the rank's torch generator draws when each epoch's iterator is made),
stochastic depth, dropout, mixup.

VISSL 0.1.6 seeds every rank with SEED_VALUE + rank when a process starts and
saves no generator state, so a resumed run restarts the streams from the
seed: two runs differ from the first resumed step on.

Saving. Every rank calls the checkpoint hook's `on_phase_end` and `on_step`
(and convit_ssl's stop hook) in step; where that call writes a checkpoint,
the ranks first gather their states (Python's, NumPy's, torch's CPU and the
task's CUDA device's), and the checkpoint's ``classy_state_dict`` carries them
as ``rng_states``, one per rank. (A checkpoint VISSL writes on one rank alone,
on a NaN output, carries none: a collective there would hang.)

Resuming. Loading the checkpoint keeps the states aside; each rank sets its
own at the point where the uninterrupted run stood when the checkpoint was
written: before the first phase starts (a phase checkpoint: the run then
makes the next phase's iterator), or once the interrupted phase's iterator
is remade (an iteration checkpoint). A checkpoint of another world size, or
one without states, resumes from the seed as upstream does, with a warning.

Not carried: the generators inside loader worker processes. Resuming within
an epoch (an iteration checkpoint) with NUM_DATALOADER_WORKERS > 0 and random
transforms in the loader is therefore not exact; at an epoch's end it is.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

KEY = "rng_states"  # in classy_state_dict
_STASH = "_convit_ssl_rng_states"  # on the task: gathered, for the checkpoint being written
_PENDING = "_convit_ssl_resume_rng_states"  # on the task: loaded, to set when training restarts


def rank_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generators (and `device`'s, a CUDA device), in the types a
    `weights_only` load accepts (tensors, tuples, numbers: NumPy's key array as an
    int64 tensor)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rank_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Set the generators `rank_state` read."""
    name, key, pos, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_states(task: Any) -> list[dict[str, Any]]:
    """Every rank's state, in rank order (a collective: every rank calls it)."""
    state = rank_state(task.device)
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


@contextlib.contextmanager
def carried(task: Any, saving: bool = True) -> Iterator[None]:
    """Inside: the checkpoint written (`get_classy_state`) carries every rank's states.
    Every rank enters with the same `saving`."""
    if not saving:
        yield
        return
    setattr(task, _STASH, gather_states(task))
    try:
        yield
    finally:
        task.__dict__.pop(_STASH, None)


def add_to_state(task: Any, classy_state: dict[str, Any]) -> dict[str, Any]:
    states = getattr(task, _STASH, None)
    if states is not None:
        classy_state[KEY] = states
    return classy_state


def keep_for_resume(task: Any, classy_state: dict[str, Any]) -> None:
    """Set aside the loaded checkpoint's states for `restore`."""
    states = classy_state.get(KEY)
    world = torch.distributed.get_world_size() if _distributed() else 1
    if states is None:
        logging.warning(
            "this checkpoint carries no random-number states (written before convit_ssl carried them, or on a NaN): "
            "the resumed run draws from the seed, not where the interrupted run stood"
        )
    elif len(states) != world:
        logging.warning(
            f"this checkpoint's random-number states are of {len(states)} ranks, the resumed run has {world}: "
            "it draws from the seed, not where the interrupted run stood"
        )
    else:
        rank = torch.distributed.get_rank() if _distributed() else 0
        setattr(task, _PENDING, states[rank])


def restore(task: Any, mid_phase: bool) -> None:
    """Set the states kept by `keep_for_resume`, at the point that matches the
    checkpoint: `mid_phase` False before a phase starts, True once the resumed
    phase's iterator is made."""
    state = task.__dict__.get(_PENDING)
    if state is None:
        return
    if mid_phase == bool(task._compute_start_iter_from_checkpoint("train") > 0):
        set_rank_state(state, task.device)
        del task.__dict__[_PENDING]
