"""VISSL's own test suite, run under convit_ssl's patches.

VISSL's tests live in its repository (tag v0.1.6, folder ``tests/``), not in
its wheel. `run_suite(src)` runs them from a checkout, one file per child
process, against the installed (patched) VISSL: each child imports
`convit_ssl.vissl` first, as every convit_ssl entry point does, then runs
pytest on the file (VISSL's tests are unittest cases, which pytest runs) with
the tests folder on ``sys.path`` (they import ``utils`` and
``meter_test_utils`` as top-level modules, as ``python -m unittest discover
-s tests`` would) and a fresh temporary working directory (the training tests
write checkpoints there). The results come from pytest's JUnit XML.

`markdown_table(results)` is the table of docs/STACK.md: file, passed,
failed, skipped, seconds, and the failures' one-line reasons (grouped: "11
failed: <reason> (<first test>, ...)") and the skips'.

Imports nothing of VISSL: the children do.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The child: set VISSL up as convit_ssl does, then pytest on one file. VISSL's
# `gpu_test` and `augly_test` decorators return None without running the test
# when there is no GPU or no AugLy, which pytest counts as a pass: here they
# skip it, with the reason, so that the table says what did not run.
_CHILD = (
    "import sys, unittest\n"
    "import convit_ssl.vissl  # the patches, before VISSL is imported\n"
    "import torch, pytest, vissl.utils.test_utils as test_utils\n"
    "from vissl.utils.misc import is_augly_available\n"
    "test_utils.gpu_test = lambda gpu_count=1: unittest.skipIf(\n"
    "    torch.cuda.device_count() < gpu_count, f'needs {gpu_count} GPU(s)')\n"
    "test_utils.augly_test = lambda: unittest.skipIf(not is_augly_available(), 'needs AugLy')\n"
    "sys.exit(pytest.main([sys.argv[1], '-q', '-p', 'no:cacheprovider', '--import-mode=importlib',\n"
    "                      '--rootdir', sys.argv[2], '--junitxml', sys.argv[3], '-o', 'junit_family=xunit1']))\n"
)
REASON_CHARS = 200


@dataclass
class FileResult:
    file: str
    passed: int = 0
    failed: int = 0  # failures and errors (collection errors included)
    skipped: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # "test: reason", one line each
    skips: collections.Counter = field(default_factory=collections.Counter)  # reason -> count
    outcome: str = "ran"  # "ran", "timeout" or "crashed" (no report written)


def tests_folder(src: str | os.PathLike) -> Path:
    """The folder of VISSL's tests in `src` (a checkout of the repository, or its ``tests`` folder)."""
    src = Path(src)
    for folder in (src / "tests", src):
        if folder.is_dir() and any(folder.glob("test_*.py")):
            return folder
    raise FileNotFoundError(f"{src}: no test_*.py files in it or in its tests/ folder (expected a VISSL checkout)")


def one_line(text: str | None) -> str:
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def reason(element: ET.Element) -> str:
    """A failure's, error's or skip's one line: pytest's message, or for a file
    that failed to import (message "collection failure") the error it raised."""
    message = element.get("message") or ""
    if message in ("", "collection failure"):
        raised = [x[1:].strip() for x in (element.text or "").splitlines() if x.startswith("E ")]
        if raised:
            return one_line(raised[-1])
    return one_line(message or element.text)


def read_report(path: Path, file: str, seconds: float) -> FileResult:
    """A file's result from pytest's JUnit XML."""
    result = FileResult(file, seconds=seconds)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            result.failed += 1
            result.failures.append(f"{name}: {reason(problem)}")
        elif skipped is not None:
            result.skipped += 1
            result.skips[reason(skipped)] += 1
        else:
            result.passed += 1
    return result


def run_file(path: Path, folder: Path, timeout: float) -> FileResult:
    """Run one test file in a child process; its result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vissl_selftest_") as work:
        report = Path(work) / "report.xml"
        command = [sys.executable, "-c", _CHILD, str(path), str(folder), str(report)]
        try:
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            result = FileResult(path.name, seconds=time.monotonic() - start, outcome="timeout")
            result.failed = 1
            result.failures.append(f"(file): no result within {timeout:.0f} s")
            return result
        seconds = time.monotonic() - start
        if report.is_file():
            return read_report(report, path.name, seconds)
    result = FileResult(path.name, failed=1, seconds=seconds, outcome="crashed")
    tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    result.failures.append(f"(file): exit {done.returncode}, {one_line(tail[-1] if tail else '')}")
    return result


def run_suite(
    src: str | os.PathLike,
    select: Sequence[str] = (),
    timeout: float = 900.0,
    progress: Callable[[FileResult], None] | None = None,
) -> list[FileResult]:
    """Run each ``test_*.py`` of the suite (those whose names contain one of
    `select`, when given), in name order."""
    folder = tests_folder(src)
    files = sorted(folder.glob("test_*.py"))
    if select:
        files = [f for f in files if any(s in f.name for s in select)]
        if not files:
            raise FileNotFoundError(f"{folder}: no test file matches {', '.join(select)}")
    results = []
    for path in files:
        results.append(run_file(path, folder, timeout))
        if progress is not None:
            progress(results[-1])
    return results


def _failure_groups(failures: Sequence[str]) -> list[str]:
    """Failures grouped by their reason: "N failed: reason (first test, ...)"."""
    groups: dict[str, list[str]] = {}
    for failure in failures:
        test, _, why = failure.partition(": ")
        groups.setdefault(why, []).append(test)
    return [
        f"{len(tests)} failed: {why} ({tests[0]}{', ...' if len(tests) > 1 else ''})" for why, tests in groups.items()
    ]


def markdown_table(results: Sequence[FileResult]) -> str:
    """file | passed | failed | skipped | s | failures (grouped by reason) and skip reasons."""
    rows = ["| file | passed | failed | skipped | s | failures; skip reasons |", "|---|---|---|---|---|---|"]
    for r in results:
        notes = _failure_groups(r.failures) + [f"skipped {n}: {reason}" for reason, n in sorted(r.skips.items())]
        rows.append(
            f"| {r.file} | {r.passed} | {r.failed} | {r.skipped} | {r.seconds:.0f} | "
            + "<br>".join(n.replace("|", "\\|") for n in notes)
            + " |"
        )
    total = [sum(getattr(r, k) for r in results) for k in ("passed", "failed", "skipped", "seconds")]
    rows.append(f"| all {len(results)} files | {total[0]} | {total[1]} | {total[2]} | {total[3]:.0f} | |")
    return "\n".join(rows)
