"""The online kNN monitor (convit_ssl/vissl/hooks/knn.py): its config block, its
numbers against an independent computation (the trunk of the checkpoint
written at the same iteration, images read with PIL, scikit-learn's kNN), 1
against 2 processes, no effect on training, auto-resume, TensorBoard and
metrics.json, and DINO's momentum teacher."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torchvision import transforms

from convit_ssl.checkpoints import run_folder
from convit_ssl.models import create_model
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.hooks.knn import RECORD_FILE, ConViTKnnHook, knn_settings
from convit_ssl.vissl.model.trunk import named_features
from convit_ssl.vissl.run.validate import validate
from helpers import folder_overrides, run_engine

FOLDER = "config=test/convit_ssl/supervised_micro_folder"
MICRO = dict(img_size=32, patch_size=8, width=48, depth=3, num_gpsa_layers=2, num_classes=0)
BANK, QUERIES = 300, 120  # MAX_TRAIN_IMAGES / MAX_VAL_IMAGES of the runs below


def _records(checkpoint_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint_dir / RECORD_FILE).read_text().splitlines()]


def _trunk(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["classy_state_dict"]["base_model"]["model"][
        "trunk"
    ]


def _run(digits: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        FOLDER,
        "+config/convit_ssl/hooks=knn",
        *folder_overrides(digits),
        "config.OPTIMIZER.num_epochs=2",
        f"config.HOOKS.CONVIT_KNN.MAX_TRAIN_IMAGES={BANK}",
        f"config.HOOKS.CONVIT_KNN.MAX_VAL_IMAGES={QUERIES}",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        f"config.CHECKPOINT.DIR={checkpoint_dir}",
        *extra,
    ]


def _independent_knn(trunk: dict, digits: Path) -> float:
    """kNN top-1 of `trunk` on the hook's strided subsets, computed without VISSL or
    convit_ssl.evaluation: images read with PIL, scikit-learn's weighted kNN."""
    model = create_model("convit_tiny", **MICRO)
    model.load_state_dict(trunk)
    model.eval()
    prepare = transforms.Compose(
        [
            transforms.Resize(32),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize([0.3] * 3, [0.4] * 3),
        ]
    )

    def features(split: str, limit: int):
        paths = sorted((digits / split).glob("*/*.png"))
        chosen = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        images = torch.stack([prepare(Image.open(paths[i]).convert("RGB")) for i in chosen])
        with torch.no_grad():
            out = named_features(model, images, ["lastCLS"])[0].numpy()
        return out, np.array([int(paths[i].parent.name) for i in chosen])

    (bank, bank_y), (queries, query_y) = features("train", BANK), features("val", QUERIES)
    clf = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07)
    ).fit(bank, bank_y)
    return float((clf.predict(queries) == query_y).mean() * 100)


# ------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, message",
    [
        ("+config.HOOKS.CONVIT_KNN.TOPKK=5", r"unknown key\(s\) \['TOPKK'\] in config.HOOKS.CONVIT_KNN"),
        ("config.HOOKS.CONVIT_KNN.FEATURE=lastFOO", "CONVIT_KNN.FEATURE: .*lastFOO"),
        ("config.HOOKS.CONVIT_KNN.TEACHER=true", "TEACHER=true needs a loss with a momentum teacher"),
        ("config.HOOKS.CONVIT_KNN.TOPK=0", "TOPK must be an integer >= 1, got 0"),
        ("config.HOOKS.CONVIT_KNN.TEMPERATURE=-1", "TEMPERATURE must be a number > 0"),
        ("config.HOOKS.CONVIT_KNN.TRAIN_PATHS=/a", "TRAIN_PATHS must be a list of folders"),
    ],
)
def test_bad_config_is_refused_before_launch(override, message, digits):
    _, config = compose([FOLDER, "+config/convit_ssl/hooks=knn", *folder_overrides(digits), override])
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_all_triggers_off_is_refused(digits):
    _, config = compose(
        [
            FOLDER,
            "+config/convit_ssl/hooks=knn",
            "config.HOOKS.CONVIT_KNN.FREQUENCY_EPOCHS=0",
            "config.HOOKS.CONVIT_KNN.AT_START=false",
        ]
    )
    with pytest.raises(ValueError, match="are all off"):
        knn_settings(config)


def test_defaults_and_off_switch():
    _, config = compose([FOLDER, "+config.HOOKS.CONVIT_KNN.USE=true"])
    settings = knn_settings(config)
    assert (settings.k, settings.temperature, settings.feature, settings.frequency_epochs) == (20, 0.07, "lastCLS", 1)
    assert knn_settings(compose([FOLDER])[1]) is None
    assert (
        knn_settings(compose([FOLDER, "+config/convit_ssl/hooks=knn", "config.HOOKS.CONVIT_KNN.USE=false"])[1]) is None
    )


def test_hook_leaves_training_state_alone(digits, tmp_path):
    """Train/eval flags (mixed), gradients and every RNG stream are as before a measurement."""
    _, config = compose(_run(digits, tmp_path))
    base = nn.Module()
    base.trunk = create_model("convit_tiny", **MICRO, drop_path_rate=0.1)
    base.train()
    base.trunk.blocks[1].eval()
    flags = {name: m.training for name, m in base.named_modules()}
    for p in base.parameters():
        p.grad = torch.randn_like(p)
    grads = {name: p.grad.clone() for name, p in base.named_parameters()}
    task = SimpleNamespace(base_model=base, config=config, iteration=0, train=True, train_phase_idx=-1, loss=None)
    hook = ConViTKnnHook(knn_settings(config), str(tmp_path / RECORD_FILE), str(tmp_path / "metrics.json"))
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    hook.on_start(task)  # AT_START: one record
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    assert {name: m.training for name, m in base.named_modules()} == flags
    for name, p in base.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert [r["iteration"] for r in _records(tmp_path)] == [0]
    assert hook.get_classy_state() == {}  # nothing goes into VISSL's checkpoints


# ------------------------------------------------------------- engine runs
@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, digits) -> Path:
    """supervised_micro_folder with the kNN hook, 1 process: 2 epochs x 16 iterations,
    a record at the start and after each epoch, TensorBoard on."""
    work = tmp_path_factory.mktemp("knn_hook")
    run_engine(_run(digits, work / "ck"), cwd=work)
    return work / "ck"


def test_records_equal_an_independent_knn_of_the_checkpoints(epoch_run, digits):
    records = _records(epoch_run)
    assert [(r["iteration"], r["epoch"]) for r in records] == [(0, -1), (16, 0), (32, 1)]
    assert all((r["num_train"], r["num_val"], r["k"], r["feature"]) == (BANK, QUERIES, 20, "lastCLS") for r in records)
    # the epoch-0 record was taken before the epoch-0 checkpoint, the last one before the final checkpoint
    for record, checkpoint in ((records[1], "model_phase0.torch"), (records[2], "model_final_checkpoint_phase1.torch")):
        assert record["student"]["top1"] == pytest.approx(
            _independent_knn(_trunk(epoch_run / checkpoint), digits), abs=1e-4
        )
        assert record["student"]["top5"] >= record["student"]["top1"]


def test_metrics_json_and_tensorboard(epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records(epoch_run)
    knn_lines = [m for m in run_folder.metrics(epoch_run) if "knn" in m]
    assert [(m["iteration"], m["knn"]) for m in knn_lines] == [
        (r["iteration"], {"student": r["student"]}) for r in records
    ]
    events = EventAccumulator(str(epoch_run / "tb_logs"))
    events.Reload()
    top1 = events.Scalars("knn/student/top1")
    assert [e.step for e in top1] == [0, 16, 32]
    assert [e.value for e in top1] == pytest.approx([r["student"]["top1"] for r in records])


def test_hook_does_not_change_training(epoch_run, digits, tmp_path):
    """The same run with the hook off trains bit-identical weights."""
    checkpoint_dir = tmp_path / "ck"
    run_engine(_run(digits, checkpoint_dir, "config.HOOKS.CONVIT_KNN.USE=false"), cwd=tmp_path)
    assert not (checkpoint_dir / RECORD_FILE).exists()
    with_hook = _trunk(epoch_run / "model_final_checkpoint_phase1.torch")
    without = _trunk(checkpoint_dir / "model_final_checkpoint_phase1.torch")
    for key, value in with_hook.items():
        assert torch.equal(value, without[key]), key


@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(epoch_run, digits, tmp_path):
    """2 ranks extract half of each split each; rank 0 logs. Before training both
    runs hold the same weights, so the numbers are the 1-process ones; after
    training they are those of the 2-process run's own checkpoint."""
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(_run(digits, checkpoint_dir, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"), cwd=tmp_path)
    assert proc.stdout.count("ConViT kNN: lastCLS of") == 1  # rank 0 logs
    records = _records(checkpoint_dir)
    assert [r["iteration"] for r in records] == [0, 8, 16]  # 2 ranks x 4 images per iteration
    assert records[0]["student"] == _records(epoch_run)[0]["student"]
    final = _trunk(checkpoint_dir / "model_final_checkpoint_phase1.torch")
    assert records[-1]["student"]["top1"] == pytest.approx(_independent_knn(final, digits), abs=1e-4)


def test_resume_keeps_one_record_per_trigger(epoch_run, digits, tmp_path):
    """Killed after the epoch-1 record (and mid-line) but before its checkpoint: the
    run resumes at iteration 16, drops the later records and logs epoch 1 once."""
    checkpoint_dir = tmp_path / "ck"
    shutil.copytree(epoch_run, checkpoint_dir, symlinks=True)
    for name in ("checkpoint.torch", "model_final_checkpoint_phase1.torch"):
        (checkpoint_dir / name).unlink()
    with open(checkpoint_dir / RECORD_FILE, "a") as f:
        f.write('{"iteration": 33, "epo')
    run_engine(_run(digits, checkpoint_dir), cwd=tmp_path)
    records = _records(checkpoint_dir)
    assert [r["iteration"] for r in records] == [0, 16, 32]
    assert records[:2] == _records(epoch_run)[:2]


def test_dino_teacher_is_measured(digits, tmp_path):
    """DINO's twin on synthetic images, monitored on the digits: the momentum
    teacher is measured once it exists (after the first forward), beside the student."""
    checkpoint_dir = tmp_path / "ck"
    run_engine(
        [
            "config=test/convit_ssl/ssl/dino_micro_synthetic",
            "+config/convit_ssl/hooks=knn",
            f"config.HOOKS.CONVIT_KNN.TRAIN_PATHS=[{digits / 'train'}]",
            f"config.HOOKS.CONVIT_KNN.VAL_PATHS=[{digits / 'val'}]",
            "config.HOOKS.CONVIT_KNN.TEACHER=true",
            "config.HOOKS.CONVIT_KNN.MAX_TRAIN_IMAGES=200",
            "config.HOOKS.CONVIT_KNN.MAX_VAL_IMAGES=100",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    start, end = _records(checkpoint_dir)
    assert set(start) >= {"student"} and "teacher" not in start  # DINO builds the teacher at the first forward
    assert set(end) >= {"student", "teacher"} and 0 < end["teacher"]["top1"] <= 100
