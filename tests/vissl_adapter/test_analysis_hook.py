"""The live ConViT analysis hook (convit_ssl/vissl/hooks/analysis.py): its
numbers, its config checks, and real VISSL runs (1 and 2 processes, gloo)
through tools/run_distributed_engines.py that write the expected records."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from convit_ssl.analysis import analyze
from convit_ssl.models import create_model
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.hooks.analysis import (
    RECORD_FILE,
    AnalysisSettings,
    ConViTAnalysisHook,
    analysis_record,
    analysis_settings,
    scalars,
)
from convit_ssl.vissl.hooks.images import eval_transforms, load_held_out_images
from convit_ssl.vissl.model.trunk import find_convit
from convit_ssl.vissl.run.hooks import hook_generator
from convit_ssl.vissl.run.validate import validate
from helpers import folder_overrides, run_engine

ANALYSIS_FOLDER = "config=test/convit_ssl/analysis_hook_micro_folder"
SYNTHETIC = "config=test/convit_ssl/supervised_micro_synthetic"
HEADS, KINDS = 4, ["gpsa", "gpsa", "mhsa"]


def _micro_model() -> nn.Module:
    """The trunk of the test/convit_ssl configs as a plain ConViT."""
    return create_model(
        "convit_tiny",
        img_size=32,
        patch_size=8,
        width=48,
        depth=3,
        num_gpsa_layers=2,
        num_classes=0,
        drop_path_rate=0.1,
    )


def _records(checkpoint_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint_dir / RECORD_FILE).read_text().splitlines()]


def _trunk(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["classy_state_dict"]["base_model"]["model"]["trunk"]


def _check_structure(record: dict, num_images: int) -> None:
    assert set(record) == {"iteration", "epoch", "num_images", "grid", "layers"}
    assert record["num_images"] == num_images and record["grid"] == [4, 4]
    assert [layer["kind"] for layer in record["layers"]] == KINDS
    assert [layer["index"] for layer in record["layers"]] == [0, 1, 2]
    for layer in record["layers"]:
        terms = ["combined", "positional", "content"] if layer["kind"] == "gpsa" else ["combined"]
        assert sorted(layer["nonlocality"]) == sorted(terms)
        assert ("gate" in layer) == (layer["kind"] == "gpsa")
        for values in [layer.get("gate", [0.5] * HEADS), *layer["nonlocality"].values()]:
            assert len(values) == HEADS
            assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)
        if layer["kind"] == "gpsa":
            assert all(0 < g < 1 for g in layer["gate"])


def _check_gates_match(record: dict, trunk: dict) -> None:
    for layer in record["layers"]:
        if layer["kind"] == "gpsa":
            expected = torch.sigmoid(trunk[f"blocks.{layer['index']}.attn.gating_param"].float())
            torch.testing.assert_close(torch.tensor(layer["gate"]), expected)


# ---------------------------------------------------------------- the numbers
def test_record_is_analyze_without_maps():
    torch.manual_seed(0)
    model = _micro_model()
    images = torch.randn(3, 3, 32, 32)
    record = analysis_record(model, images)
    full = analyze(model, images)
    assert record["grid"] == full["grid"] and record["num_images"] == 3
    dropped = {"attention_map", "positional_centre", "locality_strength", "span"}
    assert record["layers"] == [{k: v for k, v in layer.items() if k not in dropped} for layer in full["layers"]]
    json.dumps(record, allow_nan=False)


def test_scalars_tags():
    record = {
        "layers": [
            {
                "index": 0,
                "kind": "gpsa",
                "gate": [0.2, 0.4],
                "nonlocality": {"combined": [1.0, 3.0], "positional": [1.0, 1.0], "content": [2.0, None]},
            },
            {"index": 1, "kind": "mhsa", "nonlocality": {"combined": [2.0, 2.5]}},
        ]
    }
    tags = scalars(record)
    assert tags["convit/gate/layer0/head1"] == 0.4
    assert tags["convit/gate/layer0/mean"] == pytest.approx(0.3)
    assert tags["convit/nonlocality/layer0/mean"] == 2.0
    assert tags["convit/nonlocality_content/layer0/mean"] == 2.0  # None is left out
    assert "convit/nonlocality_content/layer0/head1" not in tags
    assert tags["convit/nonlocality/layer1/head1"] == 2.5
    assert not any(tag.startswith("convit/gate/layer1") for tag in tags)


def test_find_convit():
    trunk = _micro_model()
    assert find_convit(nn.Sequential(nn.Identity(), nn.Sequential(trunk)), "hook") is trunk
    holder = nn.Module()
    holder.trunk = trunk
    assert find_convit(holder, "hook") is trunk
    with pytest.raises(ValueError, match="hook: no convit_ssl ConViT in the model"):
        find_convit(nn.Linear(2, 2), "hook")
    with pytest.raises(ValueError, match="hook: 2 convit_ssl ConViTs in the model"):
        find_convit(nn.Sequential(trunk, _micro_model()), "hook")


def test_hook_leaves_training_state_alone(tmp_path):
    """Train/eval flags (mixed), gradients and every RNG stream are as before."""
    _, config = compose([SYNTHETIC, "+config.HOOKS.CONVIT_ANALYSIS.USE=true"])
    base = nn.Module()
    base.trunk = _micro_model()
    base.train()
    base.trunk.blocks[1].eval()
    flags = {name: m.training for name, m in base.named_modules()}
    for p in base.parameters():
        p.grad = torch.randn_like(p)
    grads = {name: p.grad.clone() for name, p in base.named_parameters()}
    task = SimpleNamespace(base_model=base, config=config, iteration=6, train=True, train_phase_idx=1)
    hook = ConViTAnalysisHook(AnalysisSettings(frequency_iters=3, num_images=2), str(tmp_path / RECORD_FILE))
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    hook.on_start(task)
    hook.on_step(task)
    task.iteration = 7
    hook.on_step(task)  # not a multiple of 3: nothing
    hook.on_phase_end(task)  # FREQUENCY_ITERS > 0: phase ends log nothing

    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    assert {name: m.training for name, m in base.named_modules()} == flags
    for name, p in base.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    records = _records(tmp_path)
    assert [(r["iteration"], r["epoch"]) for r in records] == [(6, 1)]
    _check_structure(records[0], num_images=2)
    assert hook.get_classy_state() == {}  # nothing goes into VISSL's checkpoints


# -------------------------------------------------------------- the images
def test_eval_transforms_are_deterministic_and_keep_normalize():
    _, config = compose([ANALYSIS_FOLDER])
    transforms = eval_transforms(config, "TEST", (32, 48))
    assert transforms == [
        {"name": "Resize", "size": 48},
        {"name": "CenterCrop", "size": [32, 48]},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4]},
    ]


def test_held_out_images_fixed_and_from_test_split(digits):
    _, config = compose([ANALYSIS_FOLDER, *folder_overrides(digits)])
    first = load_held_out_images(config, 5, (32, 32))
    assert first.shape == (5, 3, 32, 32)
    assert torch.equal(first, load_held_out_images(config, 5, (32, 32)))
    _, train_only = compose([ANALYSIS_FOLDER, *folder_overrides(digits), "config.TEST_MODEL=false"])
    assert not torch.equal(first, load_held_out_images(train_only, 5, (32, 32)))  # TRAIN when TEST is unused


def test_unreadable_images_are_a_clear_error(tmp_path):
    bad = tmp_path / "broken" / "a" / "0.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    missing = folder_overrides(tmp_path)  # tmp_path/{train,val} do not exist
    _, config = compose([ANALYSIS_FOLDER, *missing])
    with pytest.raises(
        RuntimeError, match=r"held-out images from config\.DATA\.TEST \['folder_val'\]: could not be read"
    ):
        load_held_out_images(config, 2, (32, 32))
    folder = bad.parents[1]
    paths = [f"config.DATA.TEST.DATA_PATHS=[{folder}]", f"config.DATA.TEST.LABEL_PATHS=[{folder}]"]
    _, config = compose([ANALYSIS_FOLDER, *missing, *paths, "config.DATA.TEST.DATA_LIMIT=-1"])
    # VISSL (with the patch "disk images read once") returns a placeholder image for it
    with pytest.raises(RuntimeError, match=r"samples \[0\] could not be read \(VISSL returned placeholder"):
        load_held_out_images(config, 2, (32, 32))
    # A file list: the same.
    filelist = tmp_path / "images.npy"
    np.save(filelist, np.array([str(bad)]))
    _, config = compose(
        [
            ANALYSIS_FOLDER,
            *missing,
            "config.DATA.TEST.DATA_SOURCES=[disk_filelist]",
            f"config.DATA.TEST.DATA_PATHS=[{filelist}]",
            "config.DATA.TEST.DATA_LIMIT=-1",
        ]
    )
    with pytest.raises(RuntimeError, match=r"samples \[0\] could not be read \(VISSL returned placeholder"):
        load_held_out_images(config, 2, (32, 32))


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+config.HOOKS.CONVIT_ANALYSIS.FREQUENCY=5",
            r"unknown key\(s\) \['FREQUENCY'\] in config\.HOOKS\.CONVIT_ANALYSIS; valid: USE, FREQUENCY_ITERS, NUM_IMAGES",
        ),
        (
            "config.HOOKS.CONVIT_ANALYSIS.FREQUENCY_ITERS=-1",
            r"CONVIT_ANALYSIS\.FREQUENCY_ITERS must be an integer >= 0.*-1",
        ),
        ("config.HOOKS.CONVIT_ANALYSIS.FREQUENCY_ITERS=2.5", r"FREQUENCY_ITERS must be an integer >= 0.*2\.5"),
        ("config.HOOKS.CONVIT_ANALYSIS.NUM_IMAGES=0", r"CONVIT_ANALYSIS\.NUM_IMAGES must be an integer >= 1, got 0"),
        ("config.HOOKS.CONVIT_ANALYSIS.USE=1", r"CONVIT_ANALYSIS\.USE must be true or false, got 1"),
    ],
)
def test_bad_config_is_refused_before_launch(override, message):
    _, config = compose([SYNTHETIC, "+config/convit_ssl/hooks=analysis", override])
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_config_needs_the_convit_ssl_trunk():
    _, config = compose(["config=convit_ssl/hooks/analysis"])  # VISSL's default trunk
    with pytest.raises(ValueError, match=r"USE=true needs config\.MODEL\.TRUNK\.NAME=convit_ssl, got 'resnet'"):
        analysis_settings(config)


def test_config_defaults_and_off_switch():
    _, config = compose([SYNTHETIC])
    assert analysis_settings(config) is None  # no block: off
    _, config = compose([SYNTHETIC, "+config.HOOKS.CONVIT_ANALYSIS.USE=true"])
    assert analysis_settings(config) == AnalysisSettings(frequency_iters=0, num_images=8)
    _, config = compose(
        [
            SYNTHETIC,
            "+config/convit_ssl/hooks=analysis",
            "config.HOOKS.CONVIT_ANALYSIS.USE=false",
            "config.HOOKS.CONVIT_ANALYSIS.FREQUENCY_ITERS=-3",
        ]
    )
    with pytest.raises(ValueError, match="FREQUENCY_ITERS"):  # checked even when off
        analysis_settings(config)


def test_hook_generator(tmp_path):
    from vissl.hooks import LogLossMetricsCheckpointHook, SSLTensorboardHook, default_hook_generator

    from convit_ssl.vissl.hooks.unreadable import UnreadableImagesHook
    from convit_ssl.vissl.run.stop import StopHook

    overrides = [SYNTHETIC, f"config.CHECKPOINT.DIR={tmp_path}", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true"]
    _, config = compose(overrides)
    hooks = hook_generator(config)
    vissl_hooks = [type(h) for h in default_hook_generator(config)]
    checkpoint = vissl_hooks.index(LogLossMetricsCheckpointHook)
    # off: VISSL's own, and the count of unreadable images and the stop on a signal (always on) before the checkpoint
    assert [type(h) for h in hooks] == (
        vissl_hooks[:checkpoint] + [UnreadableImagesHook, StopHook] + vissl_hooks[checkpoint:]
    )
    _, config = compose([*overrides, "+config/convit_ssl/hooks=analysis"])
    hooks = hook_generator(config)
    names = [type(h) for h in hooks]
    ours = names.index(ConViTAnalysisHook)
    assert ours == names.index(LogLossMetricsCheckpointHook) - 2  # records precede the checkpoint (and the stop)
    assert names[ours + 1] is StopHook
    tb_hook = next(h for h in hooks if isinstance(h, SSLTensorboardHook))
    assert hooks[ours].tb_writer is tb_hook.tb_writer
    assert hooks[ours].output_path == str(tmp_path / RECORD_FILE)
    for hook in hooks:
        if isinstance(hook, SSLTensorboardHook):
            hook.tb_writer.close()


# ------------------------------------------------------------- engine runs
def _folder_run(digits: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        ANALYSIS_FOLDER,
        *folder_overrides(digits),
        f"config.CHECKPOINT.DIR={checkpoint_dir}",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        *extra,
    ]


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, digits) -> Path:
    """analysis_hook_micro_folder, 1 process: 2 epochs x 4 iterations, a record per epoch, TensorBoard on."""
    work = tmp_path_factory.mktemp("analysis")
    checkpoint_dir = work / "ck"
    run_engine(_folder_run(digits, checkpoint_dir), cwd=work)
    return checkpoint_dir


def test_epoch_records_match_the_checkpoints(epoch_run):
    records = _records(epoch_run)
    assert [(r["iteration"], r["epoch"]) for r in records] == [(4, 0), (8, 1)]
    for record in records:
        _check_structure(record, num_images=4)
    # Each record coincides with the checkpoint saved at the end of its epoch.
    _check_gates_match(records[0], _trunk(epoch_run / "model_phase0.torch"))
    _check_gates_match(records[1], _trunk(epoch_run / "model_final_checkpoint_phase1.torch"))
    assert records[0]["layers"][0]["gate"] != records[1]["layers"][0]["gate"]  # training moved the gates


def test_epoch_record_recomputed_from_the_checkpoint(epoch_run, digits):
    """The last record equals the analysis of the final checkpoint on the same held-out images."""
    model = _micro_model()
    model.load_state_dict(_trunk(epoch_run / "model_final_checkpoint_phase1.torch"))
    _, config = compose(_folder_run(digits, epoch_run))
    expected = analysis_record(model, load_held_out_images(config, 4, (32, 32)))
    last = _records(epoch_run)[-1]
    for got, want in zip(last["layers"], expected["layers"], strict=True):
        for term, values in want["nonlocality"].items():
            torch.testing.assert_close(torch.tensor(got["nonlocality"][term]), torch.tensor(values))


def test_epoch_run_tensorboard(epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(epoch_run / "tb_logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = _records(epoch_run)
    assert set(scalars(records[0])) <= tags
    assert {
        "convit/gate/layer0/head0",
        "convit/gate/layer1/mean",
        "convit/nonlocality/layer2/head3",
        "convit/nonlocality_positional/layer1/head0",
    } <= tags
    gate = events.Scalars("convit/gate/layer1/head2")
    assert [e.step for e in gate] == [4, 8]
    assert [e.value for e in gate] == pytest.approx([r["layers"][1]["gate"][2] for r in records])


def test_hook_does_not_change_training(epoch_run, digits, tmp_path):
    """The same run with the hook off trains bit-identical weights: the analysis
    touched no RNG stream, gradient or mode that training uses."""
    checkpoint_dir = tmp_path / "ck"
    run_engine(_folder_run(digits, checkpoint_dir, "config.HOOKS.CONVIT_ANALYSIS.USE=false"), cwd=tmp_path)
    assert not (checkpoint_dir / RECORD_FILE).exists()
    with_hook = _trunk(epoch_run / "model_final_checkpoint_phase1.torch")
    without = _trunk(checkpoint_dir / "model_final_checkpoint_phase1.torch")
    for key, value in with_hook.items():
        assert torch.equal(value, without[key]), key


def test_resume_drops_records_past_the_checkpoint(epoch_run, digits, tmp_path):
    """A run killed after its epoch-1 record but before the epoch-1 checkpoint
    (and while writing another line) resumes from epoch 0's checkpoint
    (iteration 4): the later records are dropped, epoch 1 is logged once."""
    checkpoint_dir = tmp_path / "ck"
    shutil.copytree(epoch_run, checkpoint_dir, symlinks=True)
    for name in ("checkpoint.torch", "model_final_checkpoint_phase1.torch"):
        (checkpoint_dir / name).unlink()
    with open(checkpoint_dir / RECORD_FILE, "a") as f:
        f.write('{"iteration": 9, "epo')
    run_engine(_folder_run(digits, checkpoint_dir), cwd=tmp_path)
    records = _records(checkpoint_dir)
    assert [(r["iteration"], r["epoch"]) for r in records] == [(4, 0), (8, 1)]
    assert records[0] == _records(epoch_run)[0]
    _check_gates_match(records[1], _trunk(checkpoint_dir / "model_final_checkpoint_phase1.torch"))


@pytest.mark.slow
def test_every_n_iterations_two_processes(digits, tmp_path):
    """2 ranks x 4 images per batch on 32 images: 4 iterations per epoch, 8 in all;
    FREQUENCY_ITERS=3 gives records at iterations 3 and 6, written by rank 0 only."""
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(
        [
            ANALYSIS_FOLDER,
            *folder_overrides(digits),
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            "config.DATA.TRAIN.DATA_LIMIT=32",
            "config.HOOKS.CONVIT_ANALYSIS.FREQUENCY_ITERS=3",
        ],
        cwd=tmp_path,
    )
    assert proc.stdout.count("ConViT analysis: 4 held-out images") == 1  # only rank 0 loaded them
    assert sorted(p.name for p in checkpoint_dir.glob("*.jsonl")) == [RECORD_FILE]
    records = _records(checkpoint_dir)
    assert [(r["iteration"], r["epoch"]) for r in records] == [(3, 0), (6, 1)]  # 4 steps an epoch: both ranks ran
    for record in records:
        _check_structure(record, num_images=4)
