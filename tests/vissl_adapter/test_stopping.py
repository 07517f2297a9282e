"""Stopping a run: a stop signal ends every process the command started, within
seconds, after the ranks have saved a resumable checkpoint of their iteration
(convit_ssl.processes, convit_ssl.vissl.run.stop). The bit-identical resume
of a preempted 2-process run is in test_distributed.py."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.processes import Stopped, forward_stop_signals, stop_children
from convit_ssl.vissl.run.launcher import ConViTSlurmJob
from helpers import start_warm

# 2000 synthetic images at 4 a step: hundreds of steps, far more than a test waits for
LONG_RUN = [
    "config=test/convit_ssl/supervised_micro_synthetic",
    "config.DATA.TRAIN.DATA_LIMIT=2000",
    "config.TRAINER.TASK_NAME=convit_ssl_task",
]


def session_processes(sid: int) -> list[str]:
    """The live (not zombie) processes of session `sid`: 'pid state command'."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [
        f"{r[0]} {r[2]} {r[3] if len(r) > 3 else ''}"
        for r in rows
        if len(r) >= 3 and r[1] == str(sid) and not r[2].startswith("Z")
    ]


def wait_for_steps(checkpoint_dir: Path, steps: int, process, timeout: float = 240) -> None:
    """Until the run has logged step `steps` (log.txt is written line by line;
    stdout.json, buffered, lags by dozens of steps)."""
    deadline = time.time() + timeout
    log = checkpoint_dir / "log.txt"
    while not (log.exists() and re.search(rf"\] iter: {steps};", log.read_text(errors="replace"))):
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.time() < deadline, f"fewer than {steps} steps within {timeout} s"
        time.sleep(0.02)


def until_gone(sid: int, timeout: float) -> None:
    """Until no live process of session `sid` is left (fails after `timeout` s)."""
    start = time.time()
    while session_processes(sid):
        assert time.time() - start < timeout, session_processes(sid)
        time.sleep(0.05)


def start_command(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`python ARGV` as a user starts it, in a session of its own (to list what it started)."""
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=cwd,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def sigterm_when(ready: Callable[[], None], process: subprocess.Popen, twice: bool = False) -> tuple[str, float]:
    """After `ready()`, SIGTERM to `process` alone (`twice`: again 50 ms later);
    returns its stderr and the seconds until no process of its session is left."""
    try:
        ready()
        process.send_signal(signal.SIGTERM)
        signalled = time.time()
        if twice:
            time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        until_gone(process.pid, timeout=10)
        return stderr, time.time() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def iteration_checkpoint(checkpoint_dir: Path) -> Path:
    """The checkpoint the stop wrote: what checkpoint.torch points at, loadable."""
    target = Path(os.path.realpath(checkpoint_dir / "checkpoint.torch"))
    assert target.name.startswith("model_iteration"), target.name
    state = torch.load(target, map_location="cpu", weights_only=False)
    assert state["iteration"] == int(target.name[len("model_iteration") : -len(".torch")])
    return target


def test_sigterm_to_the_launcher_stops_two_ranks_after_a_checkpoint(tmp_path):
    """`convit-ssl run` on 2 processes (fresh interpreters, as a user starts it),
    SIGTERM to the launcher alone, then a second one while the ranks save:
    everything ends, exit 143, one line, a loadable checkpoint of the iteration."""
    checkpoint_dir = tmp_path / "ck"
    process = start_command(
        [
            "-m",
            "convit_ssl.cli",
            "run",
            *LONG_RUN,
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        tmp_path,
    )
    # the second SIGTERM changes nothing: the ranks are saving
    stderr, gone = sigterm_when(lambda: wait_for_steps(checkpoint_dir, 2, process), process, twice=True)
    print(f"2 ranks: exit {process.returncode}, everything gone {gone:.2f} s after SIGTERM")
    assert process.returncode == 128 + signal.SIGTERM
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("convit-ssl run: stopped by SIGTERM: 2 ranks stopped; the relaunched command resumes from")
    target = iteration_checkpoint(checkpoint_dir)
    assert last.endswith(str(target))
    assert gone < 15
    assert run_folder.final_checkpoint(checkpoint_dir) is None


def test_sigint_to_the_group_stops_one_process_and_the_relaunch_resumes(tmp_path):
    """Ctrl-C (SIGINT to the process group) on a 1-process run: exit 130 after a
    checkpoint of the iteration; relaunched, the run goes on from it."""
    checkpoint_dir = tmp_path / "ck"
    overrides = [*LONG_RUN, "config.DATA.TRAIN.DATA_LIMIT=400", f"config.CHECKPOINT.DIR={checkpoint_dir}"]
    script = str(Path(__file__).resolve().parents[2] / "tools" / "run_distributed_engines.py")
    process = start_warm([script, *overrides], tmp_path, tmp_path / "log.txt")
    try:
        wait_for_steps(checkpoint_dir, 3, process)
        os.killpg(process.pid, signal.SIGINT)
        signalled = time.time()
        code = process.wait(60)
        until_gone(process.pid, timeout=10)
        gone = time.time() - signalled
    finally:
        process.kill()
    print(f"1 process: exit {code}, everything gone {gone:.2f} s after SIGINT")
    assert code == 128 + signal.SIGINT and gone < 10
    target = iteration_checkpoint(checkpoint_dir)
    stopped_at = int(target.name[len("model_iteration") : -len(".torch")])
    assert 3 <= stopped_at < 100
    assert len(run_folder.losses(checkpoint_dir)) == stopped_at

    relaunch = start_warm([script, *overrides], tmp_path, tmp_path / "log2.txt")
    assert relaunch.wait(120) == 0, (tmp_path / "log2.txt").read_text()[-3000:]
    final = run_folder.final_checkpoint(checkpoint_dir)
    assert torch.load(final, map_location="cpu", weights_only=False)["iteration"] == 100
    assert len(run_folder.losses(checkpoint_dir)) == 100  # no step trained twice


STAGES_SCRIPT = """
import sys
from pathlib import Path
from convit_ssl.experiments.stages import Stage, run_stages
from convit_ssl.processes import Stopped

out, overrides = Path(sys.argv[1]), sys.argv[2:]
stages = [Stage(name, name, lambda: overrides) for name in ("first", "second")]
try:
    run_stages(stages, out)
except Stopped as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_sigterm_to_the_demo_stops_its_stages(tmp_path):
    """The demo's stage runner (two `convit-ssl run` children side by side),
    SIGTERM to it alone: both stages stop with their checkpoints, nothing is
    left running, and it says which stages stopped."""
    script = tmp_path / "stages.py"
    script.write_text(STAGES_SCRIPT)
    process = start_command([str(script), str(tmp_path), *LONG_RUN], tmp_path)

    def both_stages_training() -> None:
        for stage in ("first", "second"):
            wait_for_steps(tmp_path / stage, 1, process)

    stderr, gone = sigterm_when(both_stages_training, process)
    print(f"demo stages: exit {process.returncode}, everything gone {gone:.2f} s after SIGTERM")
    assert process.returncode == 128 + signal.SIGTERM and gone < 15
    assert stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM: stopped the stages first, second; the same "
        "command resumes them (finished stages are reused)"
    )
    for stage in ("first", "second"):
        iteration_checkpoint(tmp_path / stage)


def _sleeper(ready, path: str) -> None:
    def on_signal(signum, frame):
        Path(path).write_text(signal.Signals(signum).name)
        sys.exit(0)

    signal.signal(signal.SIGUSR1, on_signal)
    ready.set()
    time.sleep(60)


def _stubborn(ready) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def test_slurm_checkpoint_stops_the_ranks_then_requeues(tmp_path):
    """Submitit's preemption handler calls the job's `checkpoint()` on the first
    node: its ranks get SIGUSR1 (and save); one that ignores it is killed after
    the grace period; the job resubmits itself as the same class."""
    context = multiprocessing.get_context("fork")
    ready = [context.Event(), context.Event()]
    polite = context.Process(target=_sleeper, args=(ready[0], str(tmp_path / "polite")))
    stubborn = context.Process(target=_stubborn, args=(ready[1],))
    for process, event in zip((polite, stubborn), ready):
        process.start()
        assert event.wait(30)
    os.environ["CONVIT_SSL_STOP_GRACE_S"] = "1"
    try:
        start = time.time()
        delayed = ConViTSlurmJob(engine_name="train", config={}).checkpoint()
        took = time.time() - start
    finally:
        del os.environ["CONVIT_SSL_STOP_GRACE_S"]
    assert type(delayed.function) is ConViTSlurmJob
    assert (tmp_path / "polite").read_text() == "SIGUSR1" and polite.exitcode == 0
    assert stubborn.exitcode == -signal.SIGKILL and 1 <= took < 10


def test_forwarder_in_process_raises_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped by SIGTERM") as stopped:
        with forward_stop_signals(None):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_children_of_popen(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.time()
    stop_children([child], signal.SIGTERM, grace=5)
    assert child.returncode == -signal.SIGTERM and time.time() - start < 5


class _SignalsWhilePickled:
    """Sends SIGTERM to this process while torch.save pickles it: mid-write."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (dict, ())


def test_a_signal_during_the_checkpoint_write_changes_nothing(tmp_path):
    """While a rank trains (StopHook's handlers installed), a stop signal that
    arrives in the middle of writing a checkpoint is only recorded: the write
    completes and the file loads; the run stops at the end of its step."""
    from convit_ssl.checkpoints.io import atomic_torch_save
    from convit_ssl.vissl.run.stop import StopHook

    path = tmp_path / "model_iteration7.torch"
    atomic_torch_save({"iteration": 6}, path)
    hook = StopHook()
    hook.on_start(task=None)
    try:
        atomic_torch_save({"iteration": 7, "weights": torch.ones(1000), "probe": _SignalsWhilePickled()}, path)
    finally:
        hook.on_end(task=None)
    assert hook.received == signal.SIGTERM
    state = torch.load(path, weights_only=False)
    assert state["iteration"] == 7 and state["weights"].sum() == 1000
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left
