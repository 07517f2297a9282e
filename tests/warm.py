"""The test suite's commands in forks of one Python that has imported VISSL once.

A `convit-ssl` command pays 6-8 s of imports (torch, torchvision, VISSL,
ClassyVision, hydra, scikit-learn) before it does any work. The suite runs
dozens of them, so it starts each in a fork of multiprocessing's fork server,
which imports `PRELOAD` once; a fork starts in milliseconds. The commands
themselves (the demo, tools/ssl_quality.py, the GPU check) start plain
processes: this lives in tests/ only.

    process = start(["-m", "convit_ssl.cli", "run", "config=..."], output=Path("log.txt"))
    process.join()  # process.exitcode as `python -m convit_ssl.cli run config=...` would exit

The child is otherwise the command as `python ARGV` runs it: `ARGV[0]` a
script path or `-m MODULE`, run as `__main__` with that argv, the given
working directory and environment (its PYTHONWARNINGS applied), intra-op
threads from its OMP_NUM_THREADS / MKL_NUM_THREADS, VISSL's dataset catalog
from its VISSL_DATASET_CATALOG_PATH (VISSL reads both at import, which
happened in the server), its exit code (SystemExit; 1 with the
traceback for an exception), its exit handlers.
The fork server itself runs no tensor code: a fork after OpenMP threads exist
could hang. CUDA is never initialised there either, so the children may use it.
As with multiprocessing's spawn, a child imports the parent's main module
first (as `__mp_main__`): its work must be under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import runpy
import sys
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

# What every command imports: the CLI, the patched VISSL, its engines and launcher.
# (names importable from site-packages: the server's sys.path is a fresh interpreter's, not pytest's)
PRELOAD = [
    "convit_ssl.vissl",
    "convit_ssl.cli",
    "vissl.engines.extract_features",
    "vissl.engines.train",
    "vissl.utils.distributed_launcher",
]

_context = multiprocessing.get_context("forkserver")
_server_env: dict[str, str] | None = None  # the environment the server imported VISSL with


def _apply_warning_options(value: str) -> None:
    """PYTHONWARNINGS as a fresh interpreter reads it at start-up (through
    CPython's own parser where it has one; else the options that are an action alone)."""
    options = [option for option in value.split(",") if option]
    process = getattr(warnings, "_processoptions", None)
    if process is not None:
        process(options)
        return
    for option in options:
        if ":" not in option:
            warnings.simplefilter(option)


def _run(
    argv: Sequence[str],
    cwd: str,
    env: dict[str, str],
    output: str | Connection,
    new_session: bool,
    prepare: Callable[[], None] | None,
    server_catalog: str | None,
) -> None:
    """In the fork: become `python ARGV`, exit as it would."""
    if new_session:
        os.setsid()
    if isinstance(output, Connection):
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
    else:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED would, which has no effect after start-up
    os.environ.clear()
    os.environ.update(env)
    if env.get("PYTHONWARNINGS"):
        _apply_warning_options(env["PYTHONWARNINGS"])
    os.chdir(cwd)
    # runpy's warning when the child runs a module the server has loaded (`-m convit_ssl.cli`)
    warnings.filterwarnings(
        "ignore", message=".* found in sys.modules after import of package", category=RuntimeWarning
    )
    _read_environment(env, server_catalog)
    if prepare is not None:
        prepare()
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        exit_as_an_interpreter()


def _read_environment(env: dict[str, str], server_catalog: str | None) -> None:
    """What the server read from its own environment at import, read again from
    the child's: the thread counts and VISSL's dataset catalog."""
    import torch
    from vissl.data.dataset_catalog import VisslDatasetCatalog, register_datasets
    from vissl.utils.misc import get_json_data_catalog_file

    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))  # OpenMP's and MKL's
    if env.get("VISSL_DATASET_CATALOG_PATH") != server_catalog:
        VisslDatasetCatalog.clear()
        register_datasets(get_json_data_catalog_file())  # as vissl.data.dataset_catalog does at import


def exit_as_an_interpreter() -> None:
    """What a normal interpreter exit does, for a fork that ends in os._exit
    (a multiprocessing child): the exit handlers, the logging handlers, the streams."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def start(
    argv: Sequence[str],
    output: os.PathLike | Connection,
    cwd: os.PathLike | None = None,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    prepare: Callable[[], None] | None = None,
) -> multiprocessing.Process:
    """Start `python ARGV` in a fork of the warm Python; its stdout and stderr go
    to `output` (a file, truncated, or the writing end of a `pipe()`). `cwd` and
    `env` default to this process's. With `new_session` the child leads a process
    group of its own (`os.killpg(process.pid, ...)` stops it with what it started).
    `prepare`, a module-level function, runs in the child first. Returns the
    started process: `pid`, `join(timeout)`, `exitcode`, `kill()`."""
    global _server_env
    if _server_env is None:  # the first call starts the server, with this environment
        _context.set_forkserver_preload(PRELOAD)
        _server_env = dict(os.environ)
    target = str(Path(output).resolve()) if not isinstance(output, Connection) else output
    process = _context.Process(
        target=_run,
        args=(
            list(map(str, argv)),
            str(Path(cwd or os.getcwd()).resolve()),
            dict(os.environ if env is None else env),
            target,
            new_session,
            prepare,
            _server_env.get("VISSL_DATASET_CATALOG_PATH"),
        ),
    )
    process.start()
    return process


def pipe() -> tuple[Connection, Connection]:
    """(reader, writer) for a child's output: pass `writer` to `start`, close it
    here once the child has started, read lines from `reader.fileno()`."""
    return _context.Pipe(duplex=False)
