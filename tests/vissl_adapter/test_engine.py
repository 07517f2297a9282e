"""Real VISSL engine runs on tiny configs (CPU, gloo): train, checkpoint,
read odd image files (converted, or counted as unreadable), linear evaluation and fine-tuning from the checkpoint
(several processes and nodes, killed runs and auto-resume: test_distributed.py). Every run goes through
tools/run_distributed_engines.py from a directory outside the repository."""

from __future__ import annotations

import io
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convit_ssl.checkpoints import run_folder
from convit_ssl.images import open_image
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


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims side x side pixels (over twice Pillow's
    decompression-bomb limit) with one row of data: Pillow refuses it on open."""
    png = io.BytesIO()
    Image.new("L", (1, 1)).save(png, "PNG")
    data = bytearray(png.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))


def odd_image_files(folder: Path) -> dict[str, int]:
    """Every kind of odd file a real image folder holds, in `folder`; returns how
    many of them VISSL lists as images and how many it cannot read."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    (folder / "not_an_image.png").write_bytes(b"not a png")
    (folder / "empty.jpg").write_bytes(b"")
    _bomb_png(folder / "bomb.png")
    (folder / "notes.txt").write_text("a file that is no image, by its name\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return {"listed": 7, "unreadable": 3}


def test_odd_image_files_are_converted_or_counted_never_a_crash(digits, tmp_path):
    """VISSL puts a grey image in place of a file it cannot read (a broken file,
    an empty one, a decompression bomb); the run goes on and the log says how many
    there were, per phase. CMYK, palette, alpha and 16-bit images are read as 8-bit
    RGB; files without an image suffix are not listed."""
    for split in ("train", "val"):
        for folder in sorted((digits / split).iterdir()):
            (tmp_path / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[: 1 + (split == "train" and folder.name in "123")]:
                shutil.copy(image, tmp_path / split / folder.name / image.name)
    odd = odd_image_files(tmp_path / "train" / "0")  # 13 + 7 listed: 5 batches of 4, none dropped
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
    images = 13 + odd["listed"]
    # the val split read every image: no record for it
    assert run_folder.unreadable_images(checkpoint_dir) == [
        {"phase_idx": 0, "train_phase_idx": 0, "split": "train", "unreadable": odd["unreadable"], "images": images}
    ]
    assert f"phase 0 (train): {odd['unreadable']} of {images} images could not be read" in proc.stdout
    assert "exceeds limit" in proc.stdout  # VISSL's warning says why (Pillow's DecompressionBombError)
    assert (checkpoint_dir / "model_final_checkpoint_phase0.torch").is_file()


def test_odd_image_files_read_as_8bit_rgb(tmp_path):
    """What the rank gets for each readable odd file: 8-bit RGB of the right content."""
    odd_image_files(tmp_path)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name in ("cmyk.jpg", "palette.png", "alpha.png", "sixteen_bit.png"):
        image = open_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (32, 32), name
    assert np.array_equal(np.asarray(open_image(tmp_path / "alpha.png")), rgb)
    assert np.array_equal(np.asarray(open_image(tmp_path / "sixteen_bit.png"))[..., 1], rgb[..., 0])
    with pytest.raises(Image.DecompressionBombError):
        open_image(tmp_path / "bomb.png")


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
