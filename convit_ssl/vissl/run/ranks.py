"""What every process of a VISSL run sets up first: the ranks VISSL spawns and
their data-loader workers.

A spawned rank starts in a fresh interpreter and unpickles the function it
runs; a data-loader worker (spawn or forkserver) unpickles its dataset. Both
pickles start with a function of this module (installed by the patch "ranks
and data workers set up as their parent", `compat.patches`), so each process
imports `convit_ssl.vissl` (patches, registration) before it loads anything of
VISSL's: no entry point has to set VISSL up at its top level.

`spawns_ranks(config)` is the one statement of when a run has spawned ranks
(VISSL's rule); the launcher and the rank worker both ask it. This module
imports nothing of VISSL, so the patch table can name its functions before
VISSL is loaded.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

from convit_ssl.processes import STOP_SIGNALS, Stopped
from convit_ssl.vissl.run.torchrun import started_by_torchrun


def spawns_ranks(config: Any) -> bool:
    """Whether VISSL's launcher starts the ranks as child processes (more than
    one process in the job, and no torchrun that started each rank itself)
    rather than training in the launching process."""
    world = config.DISTRIBUTED.NUM_NODES * config.DISTRIBUTED.NUM_PROC_PER_NODE
    return world > 1 and not started_by_torchrun()


def rank_worker(*args: Any, **kwargs: Any) -> None:
    """VISSL's `_distributed_worker` (`rank_worker.upstream`, set by the patch)
    in a rank. A rank gets SIGTERM if its launcher (VISSL's, or torchrun's agent)
    dies; a spawned rank stopped by a signal (`run.stop`, a checkpoint saved)
    exits 0: the launcher reports the stop."""
    cfg = kwargs["cfg"] if "cfg" in kwargs else args[1]
    spawned = spawns_ranks(cfg)
    if spawned or started_by_torchrun():
        terminate_with_parent()
    try:
        rank_worker.upstream(*args, **kwargs)  # type: ignore[attr-defined]
    except Stopped:
        if not spawned:  # one process: the launcher itself, which reports the stop
            raise


def terminate_with_parent() -> None:
    """SIGTERM to this process when its parent exits (Linux's PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent had already gone
        os.kill(os.getpid(), signal.SIGTERM)


def set_up_then_rebuild(rebuild: Callable[..., Any], args: tuple[Any, ...], state: Any) -> Any:
    """Unpickles a dataset in a data-loader worker, after `convit_ssl.vissl` is
    imported (the import of this module). The worker ignores the stop signals
    (a process group's SIGTERM would otherwise kill it under its rank, which
    then fails before it can save its checkpoint); it ends with its rank."""
    if multiprocessing.parent_process() is not None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    dataset = rebuild(*args)
    if isinstance(state, tuple):  # (__dict__, slots)
        state, slots = state
        for name, value in (slots or {}).items():
            setattr(dataset, name, value)
    dataset.__dict__.update(state or {})
    return dataset


def dataset_reduce(self: Any, protocol: int) -> tuple[Any, ...]:
    """`GenericSSLDataset.__reduce_ex__`: its pickle starts with `set_up_then_rebuild`."""
    rebuild, args, state = object.__reduce_ex__(self, protocol)[:3]
    return set_up_then_rebuild, (rebuild, args, state)
