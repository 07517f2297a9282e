"""Where ConViT and DeiT users keep weights, through the converter: timm hub
folders both ways (read as timm's `save_for_hf` writes them, written so that
`timm.create_model("local-dir:DIR", pretrained=True)` alone rebuilds the
model), official training checkpoints with their argparse.Namespace, DeiT /
ViT release weights to the DeiT baselines and back (verified against timm's
VisionTransformer), and the errors that name what a file is. The momentum
teachers of DINO and MoCo runs are in vissl_adapter/test_teacher.py."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from convit_ssl import create_model
from convit_ssl.checkpoints.convert import ConvertConfig
from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.cli.convert import run

TIMM_TINY = dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2, num_classes=10, embed_dim=16, num_heads=2)
VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _convert(inp: Path, out, **fields: Any) -> dict[str, Any]:
    return run(ConvertConfig(input=str(inp), output=str(out), **fields), log=lambda _: None)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def _vissl_trunk(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["classy_state_dict"]["base_model"]["model"]["trunk"]


def _timm_convit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _perturb(timm.create_model("convit_tiny", **TIMM_TINY), seed)


# --------------------------------------------------------------------------- 1. hub folders
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_timm_hub_folder_to_vissl_and_back_to_a_folder_timm_loads(tmp_path, safe):
    model = _timm_convit()
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=safe)
    report = _convert(tmp_path / "hf", tmp_path / "convit.torch", target_format="vissl")
    assert report["source_format"] == "timm" and report["head_classes"] == 10
    assert any("hub folder" in note for note in report["notes"])
    trunk = _vissl_trunk(tmp_path / "convit.torch")
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(trunk[key], value), key  # bit-exact

    report = _convert(tmp_path / "convit.torch", f"{tmp_path / 'out'}/", target_format="timm")
    assert "local-dir" in report["verification"] and report["max_abs_diff"] < 1e-6
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(rebuilt) is type(model) and rebuilt.num_classes == 10
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(rebuilt(_images()), model(_images()))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["num_classes"] == 10
    assert config["model_args"]["embed_dim"] == 16 and config["model_args"]["local_up_to_layer"] == 2


def test_hub_folder_of_the_real_convit_tiny_layout(tmp_path):
    """A folder as the hub cache holds timm/convit_tiny.fb_in1k (config.json without
    model_args): the architecture comes from config.json; preprocessing is carried over."""
    torch.manual_seed(0)
    model = _perturb(timm.create_model("convit_tiny"))
    folder = tmp_path / "models--timm--convit_tiny.fb_in1k" / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_args", None)
    config["pretrained_cfg"]["crop_pct"] = 0.9
    (folder / "config.json").write_text(json.dumps(config))

    report = _convert(folder, f"{tmp_path / 'out'}/", target_format="timm", keep_head=False)
    assert report["model"]["num_heads"] == 4 and report["model"]["width"] == 192
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["architecture"] == "convit_tiny" and out["num_classes"] == 0
    assert out["pretrained_cfg"]["crop_pct"] == 0.9 and out["pretrained_cfg"]["input_size"] == [3, 224, 224]
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = _images(224)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(rebuilt(x), features, rtol=0, atol=1e-6)
    assert timm.data.resolve_data_config(model=rebuilt)["crop_pct"] == 0.9


def test_hub_folder_records_the_preprocessing_asked_for(tmp_path):
    torch.save(_timm_convit().state_dict(), tmp_path / "convit.pth")
    _convert(
        tmp_path / "convit.pth",
        f"{tmp_path / 'out'}/",
        target_format="timm",
        mean=[0.3, 0.3, 0.3],
        std=[0.4, 0.4, 0.4],
        interpolation="bilinear",
    )
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    data = timm.data.resolve_data_config(model=rebuilt)
    assert tuple(data["mean"]) == (0.3, 0.3, 0.3) and tuple(data["std"]) == (0.4, 0.4, 0.4)
    assert data["interpolation"] == "bilinear" and tuple(data["input_size"]) == (3, 32, 32)


def test_hub_folder_output_replaces_only_with_overwrite_and_fails_cleanly(tmp_path):
    torch.save(_timm_convit().state_dict(), tmp_path / "convit.pth")
    out = tmp_path / "out"
    _convert(tmp_path / "convit.pth", f"{out}/", target_format="timm")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        _convert(tmp_path / "convit.pth", f"{out}/", target_format="timm")
    with pytest.raises(CheckpointError, match="verification failed"):
        _convert(
            tmp_path / "convit.pth",
            f"{out}/",
            target_format="timm",
            overwrite=True,
            image_size=48,
            verify_tolerance=-1.0,
        )
    assert sorted(os.listdir(tmp_path)) == ["convit.pth", "out"]  # no staging folder left
    assert timm.create_model(f"local-dir:{out}", pretrained=True).patch_embed.img_size == (32, 32)  # the old one
    with pytest.raises(ValueError, match="only timm and vit targets"):
        _convert(tmp_path / "convit.pth", f"{tmp_path / 'v'}/", target_format="vissl")


# --------------------------------------------------------------------------- 2. official checkpoints
def test_official_training_checkpoint_loads_with_its_namespace(tmp_path):
    """What the official main.py saves: model, optimizer, lr_scheduler, epoch, model_ema, scaler and args."""
    model = _timm_convit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(_images()).sum().backward()
    optimizer.step()
    args = argparse.Namespace(
        model="convit_tiny",
        lr=5e-4,
        epochs=300,
        data_path="/datasets/imagenet",
        nb_classes=10,
        local_up_to_layer=2,
        locality_strength=1.0,
        output_dir="out",
    )
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": {"t_initial": 300, "base_values": [5e-4], "noise_range_t": None},
            "epoch": 12,
            "model_ema": None,
            "scaler": {"scale": 65536.0, "_growth_tracker": 0},
            "args": args,
        },
        tmp_path / "checkpoint.pth",
    )
    report = _convert(tmp_path / "checkpoint.pth", tmp_path / "convit.torch", target_format="vissl")
    assert report["source_format"] == "timm" and "read timm weights from the 'model' entry" in report["notes"]
    trunk = _vissl_trunk(tmp_path / "convit.torch")
    assert all(torch.equal(trunk[k], v) for k, v in model.state_dict().items() if not k.startswith("head."))


def test_other_pickled_classes_stay_refused(tmp_path):
    args = argparse.Namespace(output_dir=Path("out"))  # a class outside the allow-list, inside the Namespace
    torch.save({"model": _timm_convit().state_dict(), "args": args}, tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"refused to load .*argparse\.Namespace.*weights_only=False"):
        _convert(tmp_path / "checkpoint.pth", tmp_path / "convit.torch", target_format="vissl")
    assert not (tmp_path / "convit.torch").exists()


# --------------------------------------------------------------------------- 3. DeiT / ViT
def _timm_vit(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturb(timm.create_model("vit_tiny_patch16_224", **{**VIT_TINY, **overrides}))


def test_deit_release_to_the_deit_baseline_matches_timm_vit(tmp_path):
    """timm's deit_tiny_patch16_224 (real dimensions) into our deit_tiny: the class
    slot folds into the class token, and our model computes timm's function."""
    torch.manual_seed(0)
    vit = _perturb(timm.create_model("deit_tiny_patch16_224"))
    torch.save({"model": vit.state_dict()}, tmp_path / "deit_tiny.pth")
    report = _convert(tmp_path / "deit_tiny.pth", tmp_path / "deit.torch", target_format="vissl", arch="deit_tiny")
    assert report["source_format"] == "vit" and report["model"]["num_gpsa_layers"] == 0
    assert any("class slot folded" in note for note in report["notes"])
    trunk = _vissl_trunk(tmp_path / "deit.torch")
    ours = create_model("deit_tiny", qkv_bias=True, num_classes=1000)
    head = torch.load(tmp_path / "deit.torch", weights_only=True)["classy_state_dict"]["base_model"]["model"]["heads"]
    ours.load_state_dict({**trunk, "head.weight": head["0.clf.0.weight"], "head.bias": head["0.clf.0.bias"]})
    x = _images(224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), vit(x), rtol=0, atol=1e-5)
    assert torch.equal(trunk["pos_embed"], vit.pos_embed[:, 1:])

    # back to timm's layout: timm's own deit_tiny_patch16_224 loads it and agrees
    _convert(tmp_path / "deit.torch", tmp_path / "back.pth", target_format="vit", arch="deit_tiny")
    again = timm.create_model("deit_tiny_patch16_224", checkpoint_path=str(tmp_path / "back.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), vit(x), rtol=0, atol=1e-5)
    # ours -> vit -> ours is bit-exact
    _convert(tmp_path / "back.pth", tmp_path / "again.torch", target_format="vissl", arch="deit_tiny")
    twice = _vissl_trunk(tmp_path / "again.torch")
    assert set(twice) == set(trunk) and all(torch.equal(twice[k], trunk[k]) for k in trunk)


def test_vit_hub_folder_heads_from_its_name_and_a_vit_folder_out(tmp_path):
    """A vit_* hub folder without model_args: the architecture name gives the heads.
    A DeiT baseline written as a vit hub folder rebuilds with timm alone."""
    vit = _timm_vit()
    timm.models.save_for_hf(vit, tmp_path / "hf", safe_serialization=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("model_args", None)
    config["architecture"] = "vit_tiny_patch16_224.augreg_in21k"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    report = _convert(tmp_path / "hf", tmp_path / "deit.torch", target_format="vissl")
    assert report["model"]["num_heads"] == 3 and report["source_format"] == "vit"

    _convert(tmp_path / "deit.torch", f"{tmp_path / 'out'}/", target_format="vit", num_heads=3)
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert isinstance(rebuilt, VisionTransformer) and rebuilt.num_classes == 5
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(_images()), vit(_images()), rtol=0, atol=1e-6)


def test_deit3_layer_scale_and_no_class_slot_convert(tmp_path):
    vit = _timm_vit(no_embed_class=True, init_values=0.1)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.uniform_(0.05, 0.5)
            block.ls2.gamma.uniform_(0.05, 0.5)
    torch.save(vit.state_dict(), tmp_path / "deit3.pth")
    report = _convert(tmp_path / "deit3.pth", tmp_path / "deit.torch", target_format="vissl", num_heads=3)
    assert any("layer scale of 2 blocks folded" in note for note in report["notes"])
    assert report["max_abs_diff"] < 1e-5  # verified against timm's VisionTransformer holding the file


@pytest.mark.parametrize(
    "kind, match",
    [
        ("distilled", "distilled DeiT"),
        ("registers", "registers"),
        ("avg", "average pooling"),
    ],
)
def test_vits_without_a_deit_counterpart_are_named(tmp_path, kind, match):
    if kind == "distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2)
    elif kind == "registers":
        model = VisionTransformer(**VIT_TINY, reg_tokens=4)
    else:
        model = VisionTransformer(**VIT_TINY, global_pool="avg", fc_norm=True)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=match):
        _convert(tmp_path / "vit.pth", tmp_path / "out.torch", target_format="vissl", num_heads=3)
    assert not (tmp_path / "out.torch").exists()


def test_a_vit_is_not_a_convit_and_a_convit_is_not_a_vit(tmp_path):
    torch.save(_timm_vit().state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="ViT / DeiT .* DeiT baselines, not convit_tiny"):
        _convert(tmp_path / "vit.pth", tmp_path / "out.torch", target_format="vissl", arch="convit_tiny")
    with pytest.raises(CheckpointError, match="number of heads is not visible"):
        _convert(tmp_path / "vit.pth", tmp_path / "out.torch", target_format="vissl")
    torch.save(_timm_convit().state_dict(), tmp_path / "convit.pth")
    with pytest.raises(CheckpointError, match="GPSA blocks has no ViT counterpart"):
        _convert(tmp_path / "convit.pth", tmp_path / "out.pth", target_format="vit")


# --------------------------------------------------------------------------- 5. what a file is
def _resnet_keys() -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("swin", "Swin Transformer"),
        ("resnet", "ResNet"),
        ("vissl_resnet", "VISSL checkpoint of another trunk: a VISSL ResNet"),
        ("vissl_vit", "VISSL checkpoint of another trunk: VISSL's vision_transformer"),
    ],
)
def test_other_models_are_named(tmp_path, kind, match):
    if kind == "swin":
        obj = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1)).state_dict()
    elif kind == "resnet":
        obj = {"model": _resnet_keys()}
    elif kind == "vissl_resnet":
        trunk = {f"_feature_blocks.{k}": v for k, v in _resnet_keys().items() if not k.startswith("fc.")}
        obj = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}
    else:
        trunk = {
            "class_token": torch.zeros(1, 1, 8),
            "pos_embedding": torch.zeros(1, 17, 8),
            "patch_embed.proj.weight": torch.zeros(8, 3, 8, 8),
        }
        obj = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}
    torch.save(obj, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=f"{match}.*converts ConViT checkpoints"):
        _convert(tmp_path / "other.pth", tmp_path / "out.torch", target_format="vissl")


def test_checkpoint_links_and_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": _timm_convit().state_dict()}, run / "model_phase3.torch")
    (run / "checkpoint.torch").symlink_to(run / "model_phase3.torch")
    report = _convert(run, tmp_path / "a.torch", target_format="vissl")  # a VISSL run folder: its latest checkpoint
    assert "checkpoint.torch -> model_phase3.torch" in report["notes"][0]
    report = _convert(run / "checkpoint.torch", tmp_path / "b.torch", target_format="vissl")  # the link itself
    assert report["source_format"] == "timm"
    for phase in (9, 14):  # a run folder extended by a longer schedule: the final checkpoint of the last phase
        torch.save({"model": _timm_convit().state_dict()}, run / f"model_final_checkpoint_phase{phase}.torch")
    report = _convert(run, tmp_path / "final.torch", target_format="vissl")
    assert "its final checkpoint model_final_checkpoint_phase14.torch" in report["notes"][0]

    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "checkpoint.torch").symlink_to("/elsewhere/run/model_phase3.torch")  # copied without its target
    with pytest.raises(
        FileNotFoundError, match="is a link to '/elsewhere/run/model_phase3.torch', which does not exist"
    ):
        _convert(copied / "checkpoint.torch", tmp_path / "c.torch", target_format="vissl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="'.*empty' is empty: expected a timm hub folder"):
        _convert(empty, tmp_path / "d.torch", target_format="vissl")
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint \(found \['notes.txt'\]\)"):
        _convert(empty, tmp_path / "d.torch", target_format="vissl")
    (empty / "config.json").write_text(json.dumps({"architecture": "convit_tiny"}))
    with pytest.raises(CheckpointError, match="has a config.json but no weights"):
        _convert(empty, tmp_path / "d.torch", target_format="vissl")
