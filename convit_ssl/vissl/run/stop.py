"""Preemption in a training rank: a stop signal (SIGTERM, SIGINT, SIGUSR1)
ends the run at the end of the iteration it arrives in, with a resumable
checkpoint of that iteration, written as every checkpoint is (atomically).

`StopHook` (in every run's hooks, `run.hooks.hook_generator`) records the signal
while the training loop runs; at the end of each step the ranks agree (one
all-reduce of a number) whether any of them was asked to stop, so that all
stop after the same iteration. VISSL's checkpoint hook then writes
`model_iteration<N>.torch` (and points `checkpoint.torch` at it), and the rank
raises `Stopped`. Relaunching the same command resumes from that checkpoint
(`resume_checkpoint`, the patch "resume from a preemption checkpoint").
More signals while saving are recorded and change nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from classy_vision.hooks.classy_hook import ClassyHook
from vissl.hooks import LogLossMetricsCheckpointHook

from convit_ssl.checkpoints import run_folder
from convit_ssl.processes import STOP_SIGNALS, Stopped
from convit_ssl.vissl.compat import rng

SYMLINK = run_folder.CHECKPOINT_LINK


class StopHook(ClassyHook):
    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_update = ClassyHook._noop
    on_phase_end = ClassyHook._noop

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self._previous: list[Any] = []
        self._stopping = False

    def _record(self, signum: int, frame: Any = None) -> None:
        if self.received is None:
            self.received = signum
            logging.info(f"{signal.Signals(signum).name}: stopping after this iteration, with a checkpoint of it")

    def on_start(self, task: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = [signal.signal(s, self._record) for s in STOP_SIGNALS]

    def on_end(self, task: Any) -> None:
        self._restore()

    def on_exception(self, task: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._stopping:  # a later signal (a second SIGTERM, torch's terminate) must not kill the exit
            return
        for s, handler in zip(STOP_SIGNALS, self._previous):
            signal.signal(s, handler)
        self._previous = []

    def _agreed_signal(self, task: Any) -> int:
        """The largest signal any rank received (0: none), the same on every rank."""
        local = self.received or 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([local], dtype=torch.int32, device=task.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_step(self, task: Any) -> None:
        signum = self._agreed_signal(task)
        if not signum:
            return
        self.received = self.received or signum
        if not task.train:
            detail = "in a test phase; the relaunched run resumes from the last phase's checkpoint"
        elif not _resumable_mid_phase(task):
            detail = (
                "this run's training sampler cannot resume mid-epoch (VISSL's default; use "
                "TRAINER.TASK_NAME=convit_ssl_task or DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER=true): "
                "the relaunched run resumes from the last phase's checkpoint"
            )
        else:
            _save_iteration_checkpoint(task)
            detail = f"saved a resumable checkpoint of iteration {task.iteration} in {task.checkpoint_folder}"
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self._stopping = True
        if threading.current_thread() is threading.main_thread():
            # Ignored, not recorded, from here to the process's end: Python's finalisation resets
            # signals with Python handlers to the default, so a later SIGTERM (a second one, the
            # launcher's forwarding) arriving while the rank exits would kill it (seen in the suite:
            # "process 0 terminated with signal SIGTERM"); it leaves ignored signals ignored.
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum, detail)


def _resumable_mid_phase(task: Any) -> bool:
    """Whether the training sampler can start mid-epoch (VISSL's stateful ones,
    convit_ssl's ConViTSampler): else an iteration checkpoint would resume with
    the epoch's first batches again and overrun the schedule."""
    loader = task.dataloaders.get("train")
    sampler = getattr(loader, "sampler", None) or getattr(getattr(loader, "dataloader", None), "sampler", None)
    return hasattr(sampler, "set_start_iter")


def _save_iteration_checkpoint(task: Any) -> None:
    """VISSL's own iteration checkpoint (LogLossMetricsCheckpointHook._checkpoint_model)."""
    hook = next((h for h in task.hooks if isinstance(h, LogLossMetricsCheckpointHook)), None)
    if hook is None:
        hook = LogLossMetricsCheckpointHook(world_size=dist.get_world_size() if dist.is_initialized() else 1)
    with rng.carried(task):  # every rank is here: they agreed to stop after this iteration
        hook._checkpoint_model(task, mode_frequency=1, mode_num=task.iteration, mode="iteration")


def resume_checkpoint(cfg: Any, checkpoint_folder: str, upstream: str | None) -> str | None:
    """The checkpoint an auto-resuming run starts from: VISSL's choice (`upstream`:
    the last phase checkpoint, or the last iteration one with
    CHECKPOINT_ITER_FREQUENCY), unless the last checkpoint written
    (`checkpoint.torch` points at it) is an iteration checkpoint VISSL does not
    look for: a preemption's."""
    if not cfg.CHECKPOINT.AUTO_RESUME:
        return upstream
    link = os.path.join(str(checkpoint_folder), SYMLINK)
    if not os.path.islink(link):
        return upstream
    target = os.path.realpath(link)
    name = os.path.basename(target)
    if not (name.startswith("model_iteration") and os.path.isfile(target)):
        return upstream
    if upstream is not None and os.path.realpath(upstream) == target:
        return upstream
    logging.info(f"Resuming from the preemption checkpoint {target}")
    return target
