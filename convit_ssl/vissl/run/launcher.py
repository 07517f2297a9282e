"""`run(overrides)`: VISSL's tools/run_distributed_engines.py, with convit_ssl's
configs on the search path and its checks before any process is spawned
(`prepare`: every user error is raised there), then `launch`.

VISSL spawns one process per rank; what a rank unpickles first is convit_ssl's
worker (the patch "ranks and data workers set up as their parent"), so the
patches and the trunk registration exist in every rank, whatever `__main__` is.
A local launch is stoppable (`launch_local`): a stop signal to this process
reaches the ranks, which save a checkpoint of their iteration and exit
(`stop`); the launch then raises `convit_ssl.processes.Stopped`, and
`convit_ssl.processes.Failed` when a checkpoint could not be written (a full
disk). Under torchrun (`run.torchrun`) no process is spawned: each process
torchrun started trains as its rank (`launch_rank`). SLURM jobs are submitted as a `ConViTSlurmJob`, a subclass of VISSL's job
whose unpickling imports this module, and so `convit_ssl.vissl`, on the
compute nodes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from torch.multiprocessing import ProcessRaisedException
from vissl.utils import distributed_launcher
from vissl.utils.checkpoint import get_checkpoint_folder, is_training_finished
from vissl.utils.distributed_launcher import _ResumableSlurmJob, launch_distributed
from vissl.utils.io import makedir
from vissl.utils.logger import setup_logging

from convit_ssl.checkpoints import run_folder
from convit_ssl.checkpoints.io import CheckpointWriteError
from convit_ssl.files import atomic_write_text
from convit_ssl.processes import Failed, Stopped, forward_stop_signals, stop_children
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.model.weights_init import prepare_weights_init
from convit_ssl.vissl.run import output_folder, torchrun
from convit_ssl.vissl.run.hooks import hook_generator
from convit_ssl.vissl.run.ranks import spawns_ranks
from convit_ssl.vissl.run.validate import validate


class ConViTSlurmJob(_ResumableSlurmJob):
    """VISSL's resumable SLURM job, pickled by reference to this module, with
    convit_ssl's hooks (VISSL's `__call__` hard-codes its default generator)."""

    def __call__(self):  # VISSL's _ResumableSlurmJob.__call__, our hook generator
        # optional dependency: submitit, only for SLURM runs
        import submitit

        environment = submitit.JobEnvironment()
        self.config.DISTRIBUTED.INIT_METHOD = "tcp"
        self.config.DISTRIBUTED.RUN_ID = f"{environment.hostnames[0]}:{self.config.SLURM.PORT_ID}"
        launch_distributed(
            cfg=self.config,
            node_id=environment.global_rank,
            engine_name=self.engine_name,
            hook_generator=hook_generator,
        )

    def checkpoint(self):
        """Submitit's preemption / time-limit handler (its USR2, `--signal=USR2@90`)
        on the first node: the ranks of this node get SIGUSR1, so all ranks save
        a checkpoint of the iteration they agree on (`stop`) and exit; then
        the job requeues as the same class and resumes from that checkpoint."""
        # optional dependency: submitit, only for SLURM runs
        import submitit

        stop_children(multiprocessing.active_children(), signal.SIGUSR1)
        return submitit.helpers.DelayedSubmission(ConViTSlurmJob(engine_name=self.engine_name, config=self.config))


def launch_on_slurm(config: Any, engine_name: str):
    """Submit with submitit exactly as VISSL's `launch_distributed_on_slurm`, with
    every `config.SLURM` setting passed through."""
    # optional dependency: submitit, only for SLURM runs
    import submitit

    slurm = config.SLURM
    makedir(slurm.LOG_FOLDER)
    executor = submitit.AutoExecutor(folder=slurm.LOG_FOLDER)
    executor.update_parameters(
        name=slurm.NAME,
        slurm_comment=slurm.COMMENT,
        slurm_partition=slurm.PARTITION,
        slurm_constraint=slurm.CONSTRAINT,
        timeout_min=slurm.TIME_HOURS * 60 + slurm.TIME_MINUTES,
        nodes=config.DISTRIBUTED.NUM_NODES,
        cpus_per_task=slurm.NUM_CPU_PER_PROC * config.DISTRIBUTED.NUM_PROC_PER_NODE,
        tasks_per_node=1,
        gpus_per_node=config.DISTRIBUTED.NUM_PROC_PER_NODE,
        mem_gb=slurm.MEM_GB,
        slurm_additional_parameters=slurm.ADDITIONAL_PARAMETERS,
    )
    job = executor.submit(ConViTSlurmJob(engine_name=engine_name, config=config))
    print(f"SUBMITTED: {job.job_id}")
    return job


def save_config(config: Any) -> None:
    """Write train_config.yaml as VISSL does (`save_attrdict_to_disk`: yaml.dump
    of the config), atomically: under torchrun every rank writes it while the
    others may read it (`output_folder.check_same_run`). VISSL saves before it
    turns FSDP's compute_dtype into a torch dtype, which YAML cannot represent;
    we validate first, so the string is restored for the dump."""
    fsdp = config.MODEL.FSDP_CONFIG
    dtype = fsdp["compute_dtype"]
    fsdp["compute_dtype"] = "float32" if dtype == torch.float32 else "float16"
    try:
        text = yaml.dump(config.to_dict())
    finally:
        fsdp["compute_dtype"] = dtype
    atomic_write_text(os.path.join(get_checkpoint_folder(config), run_folder.TRAIN_CONFIG), text)


def prepare(overrides: Sequence[str]) -> tuple[Any, Any]:
    """Compose and validate, check the run folder (writable, not another run's),
    resample the weights-init file if its grid differs, save train_config.yaml;
    returns VISSL's (args, config)."""
    if torchrun.started_by_torchrun():
        overrides = torchrun.derived_overrides(overrides)
    args, config = compose(overrides)
    validate(config)
    output_folder.check(config)
    prepare_weights_init(config)
    save_config(config)
    return args, config


def _stopped_detail(config: Any) -> str:
    """Where a stopped run's work is: the checkpoint `checkpoint.torch` points at."""
    link = os.path.join(get_checkpoint_folder(config), run_folder.CHECKPOINT_LINK)
    if not os.path.exists(link):
        return "no checkpoint written yet: the relaunched command starts over"
    return f"the relaunched command resumes from {os.path.realpath(link)}"


def _disk_full(error: BaseException, config: Any) -> Failed | None:
    """A checkpoint that could not be written (`CheckpointWriteError`, raised in
    this process or in a spawned rank, whose traceback torch passes on as text)
    as the `Failed` the command reports; None for any other error."""
    message = None
    if isinstance(error, CheckpointWriteError):
        message = error.strerror
    elif isinstance(error, ProcessRaisedException):
        marker = f"{CheckpointWriteError.__name__}: "
        last = next((line for line in reversed(error.msg.splitlines()) if marker in line), None)
        if last is not None:
            message = re.sub(r"^\[Errno \d+\] ", "", last.split(marker, 1)[1].strip())
    return None if message is None else Failed(f"{message}; free space, then {_stopped_detail(config)}")


def launch_local(config: Any, node_id: int, engine_name: str) -> None:
    """VISSL's `launch_distributed` on this node, with convit_ssl's hooks,
    stoppable: with ranks spawned (more than one process in the job), a stop
    signal is passed on to them (`convit_ssl.processes.forward_stop_signals`);
    a single process stops where it is, at the end of an iteration while it
    trains. Raises `Stopped` once everything has ended, and `Failed` when a
    checkpoint could not be written (a full disk)."""
    with forward_stop_signals(multiprocessing.active_children if spawns_ranks(config) else None) as stop:
        try:
            launch_distributed(cfg=config, node_id=node_id, engine_name=engine_name, hook_generator=hook_generator)
        except Stopped:  # this process trained and stopped (run.stop)
            raise
        except Exception as e:  # torch's ProcessExitedException: a rank killed after the grace period
            failed = _disk_full(e, config)
            if failed is not None:  # the run ends, its last checkpoint kept
                raise failed from None
            if stop.received is None:
                raise
            raise Stopped(stop.received, f"{e}; {_stopped_detail(config)}") from None
    if stop.received is not None:
        raise Stopped(stop.received, f"{config.DISTRIBUTED.NUM_PROC_PER_NODE} ranks stopped; {_stopped_detail(config)}")


def launch_rank(config: Any, node_id: int, engine_name: str) -> None:
    """One rank of a run whose processes torchrun (or another launcher setting
    torch's environment) started: VISSL's per-node set-up (a finished run ends
    here; the checkpoint to resume from), then VISSL's worker in this process,
    its process group meeting at torchrun's store (``env://``). A stop signal
    stops this rank as it stops a single-process run (`run.stop`: the ranks
    agree on an iteration and save it); a full disk raises `Failed`."""
    setup_logging(__name__)  # as VISSL's launch_distributed does
    checkpoint_folder = get_checkpoint_folder(config)
    if is_training_finished(config, checkpoint_folder=checkpoint_folder):
        logging.info(f"Training already finished in {checkpoint_folder}")
        return
    link = os.path.join(checkpoint_folder, run_folder.CHECKPOINT_LINK)
    if config.CHECKPOINT.USE_SYMLINK_CHECKPOINT_FOR_RESUME and os.path.exists(link):
        checkpoint_path = link
        logging.info(f"Resume from file: {checkpoint_path}")  # VISSL's line, as get_resume_checkpoint logs it
    else:
        checkpoint_path = distributed_launcher.get_resume_checkpoint(config, checkpoint_folder=checkpoint_folder)
    run = torchrun.shape()
    with forward_stop_signals(None):
        try:
            torchrun.init_process_group(config.DISTRIBUTED.BACKEND, run)
            distributed_launcher._distributed_worker(
                run.local_rank, config, node_id, "", engine_name, checkpoint_path, checkpoint_folder, hook_generator
            )
        except CheckpointWriteError as e:
            raise _disk_full(e, config) from None


def launch(args: Any, config: Any) -> None:
    """Launch a prepared run on SLURM, as this rank of a torchrun run
    (`launch_rank`), or locally (`launch_local`), with VISSL's default hooks plus
    convit_ssl's (`run.hooks.hook_generator`)."""
    if config.SLURM.USE_SLURM:
        launch_on_slurm(config, args.engine_name)
    elif torchrun.started_by_torchrun():
        launch_rank(config, args.node_id, args.engine_name)
    else:
        logging.getLogger(__name__).info("launching %s", args.engine_name)
        launch_local(config, args.node_id, args.engine_name)


def run(overrides: Sequence[str]) -> None:
    """`prepare`, then `launch`."""
    launch(*prepare(overrides))
