"""Real VISSL engine runs on tiny configs (CPU, gloo): train, checkpoint,
count unreadable images, linear evaluation and fine-tuning from the checkpoint
(several processes and nodes, killed runs and auto-resume: test_distributed.py). Every run goes through
tools/run_distributed_engines.py from a directory outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.models import create_model
from helpers import assert_started_from_resampled, folder_overrides, run_engine

SUPERVISED_SYNTHETIC = "config=test/convit_ssl/supervised_micro_synthetic"


def _trunk(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["classy_state_dict"]["base_model"]["model"]["trunk"]


def _micro_reference():
    return create_model("convit_tiny", img_size=32, patch_size=8, width=48, depth=3, num_gpsa_layers=2, num_classes=0)


@pytest.fixture(scope="module")
def supervised_folder_run(tmp_path_factory, digits) -> Path:
    """One supervised run on the digits folder, shared by the eval tests."""
    work = tmp_path_factory.mktemp("supervised")
    checkpoint_dir = work / "ck"
    run_engine(
        [
            "config=test/convit_ssl/supervised_micro_folder",
            *folder_overrides(digits),
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=work,
    )
    return checkpoint_dir


def test_supervised_folder_one_process(supervised_folder_run):
    final = supervised_folder_run / "model_final_checkpoint_phase0.torch"
    assert final.is_file()
    trunk = _trunk(final)
    # The trunk's keys are timm's ConViT keys (no prefix, no classifier).
    assert set(trunk) == set(_micro_reference().state_dict())
    records = run_folder.metrics(supervised_folder_run)
    assert any("test_accuracy_list_meter" in r for r in records)


def test_unreadable_images_are_counted_per_epoch(digits, tmp_path):
    """VISSL puts a grey image in place of a file it cannot read; the run goes on
    and the log says how many there were, per phase."""
    import shutil

    for split in ("train", "val"):
        for folder in sorted((digits / split).iterdir()):
            (tmp_path / split / folder.name).mkdir(parents=True)
            image = sorted(folder.glob("*.png"))[0]
            shutil.copy(image, tmp_path / split / folder.name / image.name)
    for name in ("broken_a.png", "broken_b.png"):
        (tmp_path / "train" / "0" / name).write_bytes(b"not a png")
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(
        [
            "config=test/convit_ssl/supervised_micro_folder",
            *folder_overrides(tmp_path),
            "config.DATA.TRAIN.DATA_LIMIT=-1",
            "config.DATA.TEST.DATA_LIMIT=-1",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    # the val split read every image: no record for it
    assert run_folder.unreadable_images(checkpoint_dir) == [
        {"phase_idx": 0, "train_phase_idx": 0, "split": "train", "unreadable": 2, "images": 12}
    ]
    assert "phase 0 (train): 2 of 12 images could not be read" in proc.stdout  # and the user is told
    assert (checkpoint_dir / "model_final_checkpoint_phase0.torch").is_file()


def test_linear_eval_from_checkpoint(supervised_folder_run, digits, tmp_path):
    pretrained = supervised_folder_run / "model_final_checkpoint_phase0.torch"
    checkpoint_dir = tmp_path / "ck"
    run_engine(
        [
            "config=test/convit_ssl/linear_eval_micro_folder",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    test_records = [r for r in run_folder.metrics(checkpoint_dir) if "test_accuracy_list_meter" in r]
    assert len(test_records[-1]["test_accuracy_list_meter"]["top_1"]) == 4  # one probe per feature
    # The trunk stayed frozen: its weights equal the pretrained ones (under feature-eval's prefix).
    before = _trunk(pretrained)
    after = _trunk(checkpoint_dir / "model_final_checkpoint_phase0.torch")
    assert set(after) == {f"base_model.{k}" for k in before}
    for key, value in before.items():
        torch.testing.assert_close(after[f"base_model.{key}"], value, rtol=0, atol=0)


def test_finetune_from_checkpoint(supervised_folder_run, digits, tmp_path):
    pretrained = supervised_folder_run / "model_final_checkpoint_phase0.torch"
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(
        [
            "config=test/convit_ssl/finetune_micro_folder",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    loaded = re.findall(r"Loaded: trunk\.(\S+)", proc.stdout)
    assert sorted(loaded) == sorted(_micro_reference().state_dict())  # the whole trunk, by name
    assert re.search(r"Ignored layer:\s+heads\.0", proc.stdout)  # the old head is skipped
    before = _trunk(pretrained)
    after = _trunk(checkpoint_dir / "model_final_checkpoint_phase0.torch")
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "fine-tuning did not update the trunk"
    # Started from the checkpoint, not from scratch: a small lr keeps weights close.
    assert (after["pos_embed"] - before["pos_embed"]).abs().max() < 0.05


def test_finetune_at_new_resolution(supervised_folder_run, digits, tmp_path):
    """A fine-tune config at 48 px pointed at a 32 px checkpoint just works:
    the position embedding is resampled (4x4 -> 6x6) when the run starts."""
    pretrained = supervised_folder_run / "model_final_checkpoint_phase0.torch"
    checkpoint_dir = tmp_path / "ck"
    run_engine(
        [
            "config=test/convit_ssl/finetune_micro_folder_48px",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    after = _trunk(checkpoint_dir / "model_final_checkpoint_phase0.torch")
    assert after["pos_embed"].shape == (1, 36, 48)
    assert_started_from_resampled(after["pos_embed"], _trunk(pretrained)["pos_embed"])
