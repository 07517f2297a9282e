"""Stopping a command and everything it started.

A command that starts processes (the launcher its ranks, the demo its stages)
runs them inside `forward_stop_signals(children)`. SIGTERM, SIGINT or SIGUSR1
to the command, alone or to its process group, is passed on to each child
(which stops in its own way: a training rank saves a checkpoint of the
iteration it is at, `convit_ssl.vissl.run.stop`); children still alive
`grace` seconds after the first signal are killed, at once on a second
SIGINT (Ctrl-C twice); a later SIGTERM or SIGUSR1 (SLURM's time limit after
its `--signal` warning) is passed on and kills nothing. The command then raises `Stopped`, which
the `convit-ssl` command reports in one line, exiting with 128 + the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# seconds a child has to stop after the first signal (CONVIT_SSL_STOP_GRACE_S)
DEFAULT_GRACE_S = 60.0


class Stopped(Exception):
    """A run stopped by a signal; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f": {detail}" if detail else ""))


class Failed(Exception):
    """A run that ended on a fault of its environment (a full disk) with its work
    kept; the command reports it in one line (exit code 1)."""

    exit_code = 1


def grace_seconds() -> float:
    return float(os.environ.get("CONVIT_SSL_STOP_GRACE_S", DEFAULT_GRACE_S))


def _signal(child: Any, signum: int) -> None:
    """`child`: a subprocess.Popen or a multiprocessing.Process."""
    try:
        if hasattr(child, "send_signal"):
            if child.poll() is None:
                child.send_signal(signum)
        elif child.is_alive() and child.pid:
            os.kill(child.pid, signum)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _kill(child: Any) -> None:
    try:
        child.kill()
    except (ProcessLookupError, OSError):
        pass


def stop_children(children: Iterable[Any], signum: int, grace: float | None = None) -> None:
    """Send `signum` to `children` and wait until they have ended, killing those
    alive after `grace` seconds (default: `grace_seconds()`)."""
    children = list(children)
    for child in children:
        _signal(child, signum)
    deadline = time.monotonic() + (grace_seconds() if grace is None else grace)
    for child in children:
        timeout = max(0.0, deadline - time.monotonic())
        if hasattr(child, "wait"):  # subprocess.Popen
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(child)
                child.wait()
        else:  # multiprocessing.Process
            child.join(timeout)
            if child.is_alive():
                _kill(child)
                child.join()


class StopForwarder:
    """What `forward_stop_signals` yields: `received`, the first signal (or None)."""

    def __init__(self, children: Callable[[], Iterable[Any]] | None, grace: float) -> None:
        self.children, self.grace = children, grace
        self.received: int | None = None
        self._timer: threading.Timer | None = None

    def kill_children(self) -> None:
        for child in list(self.children()):
            _kill(child)

    def handle(self, signum: int, frame: Any = None) -> None:
        if self.children is None:  # the work runs in this process: stop it here
            self.received = signum
            raise Stopped(signum)
        if self.received is None:
            self.received = signum
            self._timer = threading.Timer(self.grace, self.kill_children)
            self._timer.daemon = True
            self._timer.start()
        elif signum == signal.SIGINT:  # Ctrl-C again: stop now
            self.kill_children()
            return
        for child in list(self.children()):
            _signal(child, signum)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


@contextlib.contextmanager
def forward_stop_signals(
    children: Callable[[], Iterable[Any]] | None, grace: float | None = None
) -> Iterator[StopForwarder]:
    """Within the block, the stop signals go to `children()` (see the module
    docstring); with `children=None` (the work runs in this process) a stop
    signal raises `Stopped` where the block is. Only the main thread can
    install handlers; elsewhere the block runs unchanged."""
    forwarder = StopForwarder(children, grace_seconds() if grace is None else grace)
    if threading.current_thread() is not threading.main_thread():
        yield forwarder
        return
    previous: list[Any] = [signal.signal(s, forwarder.handle) for s in STOP_SIGNALS]
    try:
        yield forwarder
    finally:
        for s, handler in zip(STOP_SIGNALS, previous):
            signal.signal(s, handler)
        forwarder.cancel()
