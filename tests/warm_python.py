"""A Python that has imported torch, VISSL and convit_ssl.vissl once, and runs
each tool script of the tests in a fork of itself (`helpers.run_engine`,
`helpers.run_tool`).

Every VISSL job of the suite used to pay 6-7 s of imports in a fresh
interpreter before doing a second of work; a fork starts in milliseconds
with the same modules loaded. The child is the tool's own `__main__` run
by `runpy`, with the request's argv, working directory and environment, its
output in a file, in a session of its own (the client kills the group on a
timeout).

The ranks VISSL's launcher starts (`torch.multiprocessing.spawn`) would be
fresh interpreters importing all of it again; with "fork_ranks" in the request
they are forks of the tool instead (`start_processes(..., start_method="fork")`):
the same worker, arguments and process tree (children of the launcher), minus
the pickling and the re-import of `__main__`. The spawn path itself stays
tested where the suite starts a tool in a fresh interpreter
(test_launcher.test_cli_run_trains_on_two_processes, the two-host test).

    python tests/warm_python.py SOCKET_PATH

Protocol (one connection per run, newline-terminated): the client sends JSON
{"argv": [script, *args], "cwd": ..., "env": {...}, "output": path,
"fork_ranks": bool}; the
child answers its pid, then its exit code.
The server never runs tensor code itself: a fork after OpenMP threads exist
could hang.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import runpy
import signal
import socket
import sys
import traceback

import convit_ssl.cli  # noqa: F401  (the tools' imports: VISSL, ClassyVision, hydra, torch)
import convit_ssl.vissl  # noqa: F401
import vissl.engines.train  # noqa: F401
import vissl.utils.distributed_launcher  # noqa: F401


def _readline(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed the connection")
        data += chunk
    return data


def _as_fresh_process(fn, index, *args):
    """A forked rank ends as a spawned one would: with the exit handlers it
    registered itself (VISSL closes stdout.json in one), not the launcher's."""
    atexit._clear()
    try:
        fn(index, *args)
    finally:
        atexit._run_exitfuncs()
        logging.shutdown()


def _fork_ranks() -> None:
    """torch.multiprocessing.spawn, as VISSL calls it, starting forks."""
    import torch.multiprocessing as torch_mp

    def spawn(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
        worker = functools.partial(_as_fresh_process, fn)
        return torch_mp.start_processes(worker, args, nprocs, join, daemon, start_method="fork")

    torch_mp.spawn = spawn


def _run_child(conn: socket.socket, request: dict) -> None:
    """In the fork: become the tool, report its exit code, exit."""
    os.setsid()
    code = 1
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        sys.argv = list(request["argv"])
        if request.get("fork_ranks"):
            _fork_ranks()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the tool waits for its own children
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        try:
            conn.sendall(f"{code}\n".encode())
        finally:
            os._exit(code)


def main(path: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            request = json.loads(_readline(conn))
        except (ConnectionError, ValueError):
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            _run_child(conn, request)
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
