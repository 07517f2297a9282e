"""tests/warm.py: a command in a fork of the warm Python behaves as `python ARGV`."""

from __future__ import annotations

import os
import textwrap

import warm

SCRIPT = textwrap.dedent("""
    import atexit, os, sys, warnings
    loaded = "vissl.engines.train" in sys.modules  # before this script imports anything of VISSL
    print("argv", sys.argv[1:], "main", __name__, "cwd", os.getcwd(), "var", os.environ.get("WARM_TEST_VAR"))
    print("preloaded", loaded, "session leader", os.getsid(0) == os.getpid())
    print("warnings", [f[0] for f in warnings.filters[:1]])
    atexit.register(lambda: open(sys.argv[2], "w").write("exit handler ran"))
    if sys.argv[1] == "raise":
        raise ValueError("a bad input")
    sys.exit(int(sys.argv[1]))
""")


def _run(tmp_path, *args, **kwargs):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    output = tmp_path / "output.txt"
    process = warm.start([str(script), *args, str(tmp_path / "atexit.txt")], output=output, **kwargs)
    process.join(60)
    return process.exitcode, output.read_text()


def test_script_gets_argv_cwd_env_and_exits_with_its_code(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    env = dict(os.environ, WARM_TEST_VAR="set", PYTHONWARNINGS="ignore")
    code, output = _run(tmp_path, "3", cwd=tmp_path / "elsewhere", env=env, new_session=True)
    assert code == 3, output
    lines = output.splitlines()
    assert lines[0] == f"argv ['3', '{tmp_path / 'atexit.txt'}'] main __main__ cwd {tmp_path / 'elsewhere'} var set"
    assert lines[1] == "preloaded True session leader True"
    assert lines[2] == "warnings ['ignore']"  # PYTHONWARNINGS, as a fresh interpreter reads it
    assert (tmp_path / "atexit.txt").read_text() == "exit handler ran"


def test_an_exception_exits_1_with_its_traceback(tmp_path):
    code, output = _run(tmp_path, "raise", env={k: v for k, v in os.environ.items() if k != "WARM_TEST_VAR"})
    assert code == 1
    assert "Traceback (most recent call last)" in output and output.rstrip().endswith("ValueError: a bad input")
    assert "var None" in output and "session leader False" in output
    assert (tmp_path / "atexit.txt").read_text() == "exit handler ran"


def test_module_through_a_pipe():
    """`-m convit_ssl.cli ...`, its lines read as they come, as the demo does."""
    reader, writer = warm.pipe()
    process = warm.start(["-m", "convit_ssl.cli", "models"], output=writer)
    writer.close()
    with open(os.dup(reader.fileno())) as output:
        reader.close()
        lines = output.read().splitlines()
    process.join(60)
    assert process.exitcode == 0, lines
    assert any(line.startswith("convit_tiny ") for line in lines), lines


ENVIRONMENT_SCRIPT = textwrap.dedent("""
    import torch
    from vissl.data.dataset_catalog import VisslDatasetCatalog
    print(VisslDatasetCatalog.has_data("warm_catalog_test"), torch.get_num_threads())
""")


def test_child_reads_its_own_catalog_and_threads(tmp_path):
    """What VISSL and torch read from the environment at import (the dataset
    catalog, the thread count) is the child's, not the server's."""
    script = tmp_path / "environment.py"
    script.write_text(ENVIRONMENT_SCRIPT)
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        '{"warm_catalog_test": {"train": ["/data/train", "/data/train"], "val": ["/data/val", "/data/val"]}}'
    )
    base = {k: v for k, v in os.environ.items() if k not in ("VISSL_DATASET_CATALOG_PATH", "OMP_NUM_THREADS")}
    results = []
    for env in (
        dict(base, VISSL_DATASET_CATALOG_PATH=str(catalog), OMP_NUM_THREADS="1"),
        dict(base, OMP_NUM_THREADS="2"),
        dict(base, MKL_NUM_THREADS="1"),
    ):
        output = tmp_path / "output.txt"
        process = warm.start([str(script)], output=output, env=env)
        process.join(60)
        assert process.exitcode == 0, output.read_text()
        results.append(output.read_text().split())
    assert results == [["True", "1"], ["False", "2"], ["False", "1"]]
