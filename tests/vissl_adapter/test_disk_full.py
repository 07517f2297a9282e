"""The disk fills while a checkpoint is written: the run ends with one line, the
previous checkpoint and the `checkpoint.torch` link stay intact, no partial file
is left, and the same command relaunched once there is space resumes and ends
with the uninterrupted run's weights. A real full disk: a 2 MiB tmpfs, where one
checkpoint of the micro run (1.2 MB) fits and the second does not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.checkpoints.io import CheckpointWriteError, atomic_torch_save
from helpers import tmpfs

pytestmark = pytest.mark.slow

RUN = [
    "config=test/convit_ssl/supervised_micro_synthetic",
    "config.OPTIMIZER.num_epochs=2",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
]


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        yield disk


def _run(checkpoint_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convit_ssl.cli", "run", *RUN, f"config.CHECKPOINT.DIR={checkpoint_dir}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["classy_state_dict"]["base_model"]["model"]["trunk"]


def test_atomic_save_on_a_full_disk_names_it_and_replaces_nothing(small_disk):
    target = small_disk / "model.torch"
    target.write_bytes(b"the previous file")
    with pytest.raises(CheckpointWriteError, match=r"writing .*model\.torch failed: no space left on device") as e:
        atomic_torch_save({"w": torch.zeros(1_000_000)}, target)  # 4 MB
    assert e.value.errno == 28
    assert "nothing was replaced" in str(e.value)
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.torch"]  # no partial file


def test_full_disk_during_a_checkpoint_loses_nothing(small_disk, tmp_path):
    checkpoint_dir = small_disk / "ck"
    failed = _run(checkpoint_dir, tmp_path)
    last_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert re.fullmatch(
        rf"convit-ssl run: writing {checkpoint_dir}/model_final_checkpoint_phase1\.torch failed: no space left on device "
        rf"\(\d+ bytes written, \d+ bytes free\); nothing was replaced; free space, then the relaunched "
        rf"command resumes from {checkpoint_dir}/model_phase0\.torch",
        last_line,
    ), last_line
    assert "Traceback" not in failed.stderr
    assert os.path.realpath(checkpoint_dir / run_folder.CHECKPOINT_LINK) == str(checkpoint_dir / "model_phase0.torch")
    assert [p.name for p in run_folder.checkpoints(checkpoint_dir)] == ["model_phase0.torch"]
    assert not list(checkpoint_dir.glob(".*partial*"))
    _weights(checkpoint_dir / "model_phase0.torch")  # intact: it loads

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space again
    resumed = _run(checkpoint_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # VISSL's own line (vissl/utils/checkpoint.py:625) names the checkpoint it resumed from
    assert re.search(rf"Resume from file: {checkpoint_dir}/(checkpoint|model_phase0)\.torch", resumed.stdout)

    uninterrupted_dir = tmp_path / "uninterrupted"
    assert _run(uninterrupted_dir, tmp_path).returncode == 0
    final, expected = run_folder.final_checkpoint(checkpoint_dir), run_folder.final_checkpoint(uninterrupted_dir)
    assert final.name == expected.name == "model_final_checkpoint_phase1.torch"
    a, b = _weights(final), _weights(expected)
    assert all(torch.equal(a[k], b[k]) for k in a)
