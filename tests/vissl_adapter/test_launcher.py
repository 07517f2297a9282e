"""The `convit-ssl` command and the SLURM path (VISSL's settings pass through,
and the job imports convit_ssl on the compute node)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from convit_ssl.checkpoints import run_folder
from convit_ssl.checkpoints.io import load_checkpoint
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.run.launcher import ConViTSlurmJob, launch_on_slurm
from convit_ssl.vissl.run.validate import validate

SCRIPT = """
import sys
from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
"""


def test_two_ranks_with_data_workers_set_themselves_up(tmp_path):
    """A script that imports nothing of `convit_ssl.vissl` (nor VISSL) at its top
    level launches 2 ranks, each with a data-loader worker: the ranks (fresh
    interpreters from torch.multiprocessing.spawn) and the workers (from the
    forkserver) set VISSL up themselves; without the pkg_resources stand-in
    VISSL cannot even be imported on this stack."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, convit_ssl.cli; print(sorted({'convit_ssl.vissl', 'vissl'} & set(sys.modules)))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    checkpoint_dir = tmp_path / "ck"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "config=test/convit_ssl/supervised_micro_synthetic",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            "config.DATA.NUM_DATALOADER_WORKERS=1",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = run_folder.final_checkpoint(checkpoint_dir)
    assert final is not None and final.name == "model_final_checkpoint_phase0.torch"
    # 16 images, 4 per rank and step: 2 steps for a group of 2 (one process alone takes 4)
    assert load_checkpoint(final)["iteration"] == 2


def test_cli_lists_models(capsys):
    from convit_ssl.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "convit_small_plus" in out and "deit_base" in out


def test_slurm_job_imports_convit_ssl_when_unpickled():
    """A fresh interpreter that unpickles the job (as submitit does on a node)
    gets the convit_ssl trunk registered, so VISSL can build it."""
    _, config = compose(["config=test/convit_ssl/supervised_micro_synthetic"])
    payload = pickle.dumps(ConViTSlurmJob(engine_name="train", config=config))
    code = (
        "import pickle, sys\n"
        "job = pickle.loads(sys.stdin.buffer.read())\n"
        "from vissl.models.trunks import MODEL_TRUNKS_REGISTRY\n"
        "print(type(job).__name__, 'convit_ssl' in MODEL_TRUNKS_REGISTRY, job.config.MODEL.TRUNK.NAME)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().split() == ["ConViTSlurmJob", "True", "convit_ssl"]
    # On requeue the job resubmits itself as the same class.
    assert type(pickle.loads(payload).checkpoint().function) is ConViTSlurmJob


def test_slurm_settings_pass_through(tmp_path, monkeypatch):
    import submitit

    seen = {}

    class FakeExecutor:
        def __init__(self, folder):
            seen["folder"] = folder

        def update_parameters(self, **params):
            seen.update(params)

        def submit(self, job):
            seen["job"] = job
            return type("Job", (), {"job_id": "42"})()

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    _, config = compose(
        [
            "config=test/convit_ssl/supervised_micro_synthetic",
            "config.SLURM.USE_SLURM=true",
            "config.SLURM.PARTITION=learnfair",
            "config.SLURM.NAME=convit",
            "config.SLURM.TIME_HOURS=3",
            "config.SLURM.TIME_MINUTES=30",
            "config.SLURM.MEM_GB=100",
            "config.SLURM.CONSTRAINT=volta32gb",
            "config.DISTRIBUTED.NUM_NODES=2",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=8",
            f"config.SLURM.LOG_FOLDER={tmp_path}/slurm",
        ]
    )
    launch_on_slurm(config, "train")
    assert seen["slurm_partition"] == "learnfair" and seen["name"] == "convit"
    assert seen["timeout_min"] == 210 and seen["mem_gb"] == 100 and seen["slurm_constraint"] == "volta32gb"
    assert seen["nodes"] == 2 and seen["gpus_per_node"] == 8 and seen["tasks_per_node"] == 1
    assert seen["cpus_per_task"] == config.SLURM.NUM_CPU_PER_PROC * 8
    assert isinstance(seen["job"], ConViTSlurmJob) and seen["job"].engine_name == "train"


def test_slurm_needs_a_partition(tmp_path):
    _, config = compose(
        [
            "config=test/convit_ssl/supervised_micro_synthetic",
            "config.SLURM.USE_SLURM=true",
            f"config.SLURM.LOG_FOLDER={tmp_path}",
        ]
    )
    with pytest.raises(ValueError, match="config.SLURM.PARTITION must be set"):
        validate(config)
