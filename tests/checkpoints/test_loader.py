"""convit_ssl.load_model: one public function builds a ConViT from every source
the project reads, each checked against the weights or outputs of the
implementation that wrote it (timm's ConVit and VisionTransformer)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import convit_ssl
from convit_ssl.checkpoints.convert import ConvertConfig
from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.cli.convert import run as convert

TIMM_TINY = dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2, num_classes=10, embed_dim=16, num_heads=2)


def _timm_convit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("convit_tiny", **TIMM_TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Every kind of source, all holding `_timm_convit(0)` (or a DeiT for "vit")."""
    root = tmp_path_factory.mktemp("sources")
    model = _timm_convit(0)
    paths = {
        "timm file": root / "convit.pth",
        "official training checkpoint": root / "official.pth",
        "hub folder": root / "hub",
    }
    torch.save(model.state_dict(), paths["timm file"])
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": 299,
            "args": argparse.Namespace(model="convit_tiny", lr=5e-4),
        },
        paths["official training checkpoint"],
    )
    timm.models.save_for_hf(model, paths["hub folder"])
    for name, fmt in (("vissl checkpoint", "vissl"), ("vissl_convit checkpoint", "vissl_convit")):
        paths[name] = root / f"{fmt}.torch"
        convert(
            ConvertConfig(input=str(paths["timm file"]), output=str(paths[name]), target_format=fmt), log=lambda _: None
        )
    # A run folder extended by a longer schedule: the final checkpoint of the last phase is the one.
    run = paths["vissl run folder"] = root / "run"
    run.mkdir()
    shutil.copy(paths["vissl checkpoint"], run / "model_final_checkpoint_phase10.torch")
    torch.save(_timm_convit(1).state_dict(), root / "other.pth")
    convert(
        ConvertConfig(
            input=str(root / "other.pth"),
            output=str(run / "model_final_checkpoint_phase9.torch"),
            target_format="vissl",
        ),
        log=lambda _: None,
    )
    # A DINO run's checkpoint: the student is another model, the momentum teacher ours.
    student = torch.load(run / "model_final_checkpoint_phase9.torch", weights_only=True)
    trunk = torch.load(paths["vissl checkpoint"], weights_only=True)["classy_state_dict"]["base_model"]["model"][
        "trunk"
    ]
    student["classy_state_dict"]["loss"] = {f"momentum_teacher.trunk.{k}": v for k, v in trunk.items()}
    paths["DINO teacher"] = root / "dino.torch"
    torch.save(student, paths["DINO teacher"])
    return paths


@pytest.mark.parametrize(
    "kind",
    [
        "timm file",
        "official training checkpoint",
        "hub folder",
        "vissl checkpoint",
        "vissl run folder",
        "vissl_convit checkpoint",
        "DINO teacher",
    ],
)
def test_every_convit_source_gives_the_model_that_wrote_it(sources, kind):
    reference = _timm_convit(0)
    network = "teacher" if kind == "DINO teacher" else "student"
    model, info = convit_ssl.load_model(sources[kind], network=network, keep_head=kind not in ("DINO teacher",))
    assert isinstance(model, convit_ssl.ConViT) and not model.training
    expected = {k: v for k, v in reference.state_dict().items() if "head" not in k or info["head_classes"]}
    state = model.state_dict()
    assert set(state) == set(expected), set(state) ^ set(expected)
    exact = kind != "vissl_convit checkpoint"  # VISSL's built-in trunk repeats pos_proj columns: not bit-exact back
    for key, value in expected.items():
        if exact:
            assert torch.equal(state[key], value), key
        else:
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    if kind == "vissl_convit checkpoint":
        assert info["format"] == "vissl_convit" and info["model"]["norm_eps"] == 1e-5  # VISSL's LayerNorm
    else:
        with torch.no_grad():
            if info["head_classes"]:
                torch.testing.assert_close(model(_images()), reference(_images()), rtol=0, atol=1e-6)
    if kind == "vissl run folder":
        assert "its final checkpoint model_final_checkpoint_phase10.torch" in info["notes"][0]
    if kind == "DINO teacher":
        assert "the momentum teacher (network=teacher)" in info["notes"]


def test_a_deit_becomes_the_deit_baseline_with_timms_outputs(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    torch.save({"model": vit.state_dict()}, tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match="number of heads is not visible"):
        convit_ssl.load_model(tmp_path / "deit.pth")
    model, info = convit_ssl.load_model(tmp_path / "deit.pth", num_heads=3, keep_head=True)
    assert info["format"] == "vit" and info["model"]["num_gpsa_layers"] == 0 and info["head_classes"] == 5
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), vit(_images()), rtol=1e-5, atol=1e-5)


def test_bad_sources_are_named(tmp_path, sources):
    with pytest.raises(FileNotFoundError, match="is empty"):
        convit_ssl.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="was declared vissl but holds a timm checkpoint"):
        convit_ssl.load_model(sources["timm file"], fmt="vissl")
    with pytest.raises(ValueError, match="format 'onnx' is not one of auto"):
        convit_ssl.load_model(sources["timm file"], fmt="onnx")
    with pytest.raises(CheckpointError, match="network=teacher needs a VISSL checkpoint"):
        convit_ssl.load_model(sources["timm file"], network="teacher")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is not a torch checkpoint: the file is empty \(0 bytes\)"),
        (b"model: convit\nlr: 0.1\n", r"is not a torch checkpoint: it is a text file \(it begins 'model: convit'\)"),
        (bytes(range(7, 247)), r"is not a torch checkpoint: its first bytes \(07 08 09 0a 0b 0c 0d 0e\) are neither"),
        (
            "truncated",
            r"\(\d+ bytes\) is not a readable torch checkpoint \(truncated or corrupt\?\): PytorchStreamReader",
        ),
        (
            b"\x80\x02" + b"\xff" * 50,
            r"is not a readable torch checkpoint \(truncated or corrupt\?\): Unsupported operand",
        ),
    ],
    ids=["empty", "text", "random bytes", "truncated zip", "damaged pickle"],
)
def test_a_file_that_is_not_a_checkpoint_is_called_what_it_is(content, message, tmp_path):
    """One line that names what the file is; the unsafe-load advice only for a real pickle of other objects."""
    from convit_ssl.checkpoints.io import CheckpointError, load_checkpoint

    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save({"w": torch.zeros(64)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
