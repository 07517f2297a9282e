"""tools/vissl_selftest.py on a small VISSL-style suite written here: unittest
cases importing the suite's own `utils`, a pass, a failure, a skip, a
collection error and a file that never finishes: each counted with its reason."""

import json
import subprocess
import sys
import textwrap

from convit_ssl.experiments import vissl_selftest as selftest
from helpers import REPO

UTILS = """
import pkg_resources  # the stand-in on setuptools >= 81, as in VISSL's tests/utils.py
CONFIGS = pkg_resources.resource_listdir("configs", "config/test")
"""
PASSING = """
import unittest

import numpy as np
import pkg_resources
from utils import CONFIGS


class PatchedTest(unittest.TestCase):
    def test_patches_in_place(self):
        import vissl.utils.checkpoint as checkpoint

        assert np.float is float  # the numpy aliases
        assert getattr(checkpoint.save_checkpoint, "__convit_ssl_patch__", False)

    def test_test_data_beside_the_module(self):
        assert pkg_resources.resource_filename(__name__, "test_data").endswith("test_data")
        assert "cpu_test" in CONFIGS
"""
FAILING = """
import unittest

from vissl.utils.test_utils import gpu_test


class FailingTest(unittest.TestCase):
    def test_ok(self):
        pass

    def test_wrong(self):
        self.assertEqual(1, 2, "one is not two")

    @unittest.skipIf(True, "Test only runs on GPU")
    def test_gpu(self):
        pass

    @unittest.skip("Test only runs on GPU")
    def test_gpu_too(self):
        pass

    @gpu_test(gpu_count=64)  # VISSL's: returns None (a pass) without the GPUs, unless the tool makes it skip
    def test_on_64_gpus(self):
        raise AssertionError("ran without its GPUs")
"""
BROKEN = "import a_module_that_does_not_exist\n"
HANGING = "import time\n\ndef test_sleeps():\n    time.sleep(600)\n"


def write_suite(root):
    tests = root / "tests"
    tests.mkdir(parents=True)
    (tests / "__init__.py").write_text("")
    (tests / "utils.py").write_text(textwrap.dedent(UTILS))
    (tests / "test_a_passing.py").write_text(textwrap.dedent(PASSING))
    (tests / "test_b_failing.py").write_text(textwrap.dedent(FAILING))
    (tests / "test_c_broken.py").write_text(BROKEN)
    (tests / "README.md").write_text("not a test\n")


def test_selftest_counts_each_outcome_with_its_reason(tmp_path):
    write_suite(tmp_path / "vissl")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/vissl_selftest.py"), "--src", str(tmp_path / "vissl"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # a test failed
    rows = {r["file"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["test_a_passing.py", "test_b_failing.py", "test_c_broken.py"]

    passing, failing, broken = rows.values()
    assert (passing["passed"], passing["failed"], passing["skipped"]) == (2, 0, 0), passing
    assert (failing["passed"], failing["failed"], failing["skipped"]) == (1, 1, 3)
    assert failing["failures"] == ["test_wrong: AssertionError: 1 != 2 : one is not two"]
    assert failing["skips"] == {"Test only runs on GPU": 2, "needs 64 GPU(s)": 1}
    assert broken["failed"] == 1 and "a_module_that_does_not_exist" in broken["failures"][0]

    table = done.stdout[done.stdout.index("| file |") :]
    assert "| test_b_failing.py | 1 | 1 | 3 |" in table
    assert "1 failed: AssertionError: 1 != 2 : one is not two (test_wrong)" in table
    assert "skipped 2: Test only runs on GPU" in table
    assert "| all 3 files | 3 | 2 | 3 |" in table


def test_selftest_reports_a_file_that_does_not_finish(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING)
    result = selftest.run_file(tmp_path / "test_hanging.py", tmp_path, timeout=2)
    assert (result.outcome, result.failed, result.failures) == ("timeout", 1, ["(file): no result within 2 s"])


def test_selftest_refuses_a_folder_without_tests(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/vissl_selftest.py"), "--src", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {tmp_path}: no test_*.py files in it or in its tests/ folder (expected a VISSL checkout)"
    )
