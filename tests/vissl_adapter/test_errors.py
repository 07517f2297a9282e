"""Bad input fails before any process is spawned, with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.run import launcher, output_folder
from convit_ssl.vissl.run.validate import validate
from helpers import folder_overrides, run_engine, tmpfs

MICRO = "config=test/convit_ssl/supervised_micro_synthetic"
TRUNK = "config.MODEL.TRUNK.CONVIT_SSL"


def _check(*overrides):
    _, config = compose([MICRO, *overrides])
    validate(config)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ([f"+{TRUNK}.FOO=1"], ValueError, r"unknown key\(s\) \['FOO'\] in MODEL\.TRUNK\.CONVIT_SSL"),
        ([f"{TRUNK}.WIDTH=50"], ValueError, r"width 50 is not divisible by num_heads 4"),
        ([f"{TRUNK}.IMAGE_SIZE=30"], ValueError, r"image size 30x30 is not divisible by the patch size 8"),
        ([f"{TRUNK}.DEPTH=abc"], ValueError, r"DEPTH = 'abc' has type str; expected int"),
        ([f"{TRUNK}.ARCH=convit_huge"], KeyError, r"unknown architecture 'convit_huge'; available: convit_base"),
        ([f"{TRUNK}.NUM_GPSA_LAYERS=3"], ValueError, r"num_gpsa_layers must be in 0\.\.2"),
    ],
)
def test_bad_trunk_config(overrides, error, match):
    with pytest.raises(error, match=match):
        _check(*overrides)


def test_unknown_feature_name():
    ops = "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[lastFOO,[Identity,[]]]]"
    with pytest.raises(ValueError, match=r"unknown feature name 'lastFOO'; valid names: lastCLS"):
        _check(
            "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=true",
            "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=true",
            ops,
        )


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=r"dataset 'folder_train' \(disk_folder\): data folder .*nope.* does not exist"
    ):
        _, config = compose(["config=test/convit_ssl/supervised_micro_folder", *folder_overrides(missing)])
        validate(config)


def test_folder_without_path_names_the_fix():
    _, config = compose(["config=test/convit_ssl/supervised_micro_folder"])
    with pytest.raises(FileNotFoundError, match=r"set config\.DATA\.TRAIN\.DATA_PATHS=\[<folder>\]"):
        validate(config)


def test_empty_data_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images in the class folders"):
        _, config = compose(["config=test/convit_ssl/supervised_micro_folder", *folder_overrides(tmp_path)])
        validate(config)


def test_script_reports_before_spawning(tmp_path):
    """Through the real entry point: exit 2, one line (no traceback, no library
    warnings), nothing written."""
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(
        [MICRO, f"{TRUNK}.WIDTH=50", f"config.CHECKPOINT.DIR={checkpoint_dir}"], cwd=tmp_path, check=False, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        "convit-ssl run: error: MODEL.TRUNK.CONVIT_SSL: width 50 is not divisible by num_heads 4"
    ]
    assert not checkpoint_dir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "config=test/convit_ssl/no_such_config"], "convit-ssl run: error: In 'defaults': Could not find"),
        (
            ["run", MICRO, "config.OPTIMIZER.no_such_key=1"],
            "convit-ssl run: error: Could not override 'config.OPTIMIZER.no_such_key'. To append to your config use +",
        ),
        (["demo", "--data", "/no/such/folder"], "convit-ssl demo: error: --data /no/such/folder: expected"),
    ],
    ids=["unknown-config", "unknown-key", "demo-data"],
)
def test_every_command_reports_a_user_error_in_one_line(argv, message, tmp_path):
    """`convit-ssl <cmd>: error: ...` and exit 2 (convert, analyze and the
    benchmarks are checked in their own tests); CONVIT_SSL_TRACEBACK=1 shows the traceback."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)  # the command itself keeps library warnings quiet
    proc = subprocess.run(
        [sys.executable, "-m", "convit_ssl.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr
    if argv[0] == "run" and "no_such_config" in argv[1]:
        loud = subprocess.run(
            [sys.executable, "-m", "convit_ssl.cli", *argv],
            cwd=tmp_path,
            env=dict(env, CONVIT_SSL_TRACEBACK="1"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr


def test_dataset_catalog_resolves_and_checks_paths(digits, tmp_path):
    """A dataset named in a catalog (VISSL_DATASET_CATALOG_PATH) needs no DATA_PATHS;
    a catalog entry pointing nowhere is named with its path before anything starts."""
    import json

    from vissl.data.dataset_catalog import VisslDatasetCatalog, register_datasets

    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            {
                "folder_train": {"train": [str(digits / "train"), str(digits / "train")], "val": ["", ""]},
                "folder_val": {
                    "train": ["", ""],
                    "val": [str(tmp_path / "missing_val"), str(tmp_path / "missing_val")],
                },
            }
        )
    )
    register_datasets(str(catalog))
    try:
        _, config = compose(["config=test/convit_ssl/supervised_micro_folder"])
        with pytest.raises(FileNotFoundError, match=r"dataset 'folder_val' \(disk_folder\): data folder .*missing_val"):
            validate(config)
        _, config = compose(["config=test/convit_ssl/supervised_micro_folder", "config.TEST_MODEL=false"])
        validate(config)  # the train split resolves through the catalog
    finally:
        VisslDatasetCatalog.clear()


def test_data_paths_without_label_paths(digits):
    """VISSL would look the labels up in the catalog and fail inside the rank: caught before."""
    train = digits / "train"
    _, config = compose(
        [
            "config=test/convit_ssl/supervised_micro_folder",
            "config.TEST_MODEL=false",
            f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
        ]
    )
    with pytest.raises(ValueError, match=r"LABEL_PATHS is empty and \['folder_train'\] is not in the dataset catalog"):
        validate(config)


# ----------------------------------------------------------------------------
# Data that would break a rank, refused before anything is spawned.
# ----------------------------------------------------------------------------

FOLDER = "config=test/convit_ssl/supervised_micro_folder"


def _copy_digits(digits, root, classes=None, split_classes=None):
    """root/{train,val}/<class>/ with the digits' images (a few per class)."""
    import shutil

    for split in ("train", "val"):
        for folder in sorted((digits / split).iterdir()):
            names = (split_classes or {}).get(split, classes)
            if names is not None and folder.name not in names:
                continue
            target = root / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[:3]:
                shutil.copy(image, target / image.name)
    return root


def test_empty_class_folder_among_full_ones(digits, tmp_path):
    root = _copy_digits(digits, tmp_path)
    for image in (root / "train" / "3").iterdir():
        image.unlink()
    (root / "train" / "3" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"1 of 10 class folders of .*train.* hold no image \(3\)"):
        _check_folder(root)


def test_train_and_val_with_different_classes(digits, tmp_path):
    root = _copy_digits(
        digits,
        tmp_path,
        split_classes={"train": [str(i) for i in range(10)], "val": [str(i) for i in range(1, 10)] + ["x"]},
    )
    (root / "val" / "x").mkdir()
    import shutil

    shutil.copy(next((root / "val" / "1").iterdir()), root / "val" / "x" / "a.png")
    with pytest.raises(ValueError, match=r"different class folders \(10 and 10; missing in TEST: 0; only in TEST: x\)"):
        _check_folder(root)


def test_head_outputs_differ_from_the_classes(digits, tmp_path):
    root = _copy_digits(digits, tmp_path, classes=[str(i) for i in range(7)])
    with pytest.raises(
        ValueError, match=r"HEAD.PARAMS\[0\] \(mlp\) has 10 outputs but the training labels have 7 classes"
    ):
        _check_folder(root)
    _check_folder(root, "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,7]}]]")


def test_mixup_classes_differ_from_the_labels(digits):
    from helpers import folder_overrides as folders

    _, config = compose(
        [
            "config=test/convit_ssl/recipe/supervised_recipe_micro_folder",
            *folders(digits),
            "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes=1000",
        ]
    )
    with pytest.raises(
        ValueError, match=r"COLLATE_FUNCTION_PARAMS.num_classes is 1000 but the training labels have 10"
    ):
        validate(config)


def test_paths_and_sources_counts_differ(digits):
    with pytest.raises(ValueError, match=r"1 DATA_SOURCES but 2 DATA_PATHS; give one path per source"):
        _check_folder(digits, f"config.DATA.TRAIN.DATA_PATHS=[{digits / 'train'},{digits / 'train'}]")
    with pytest.raises(ValueError, match=r"1 LABEL_SOURCES but 2 LABEL_PATHS"):
        _check_folder(digits, f"config.DATA.TRAIN.LABEL_PATHS=[{digits / 'train'},{digits / 'train'}]")


def test_missing_filelist(digits_filelists, tmp_path):
    from helpers import filelist_overrides

    base = ["config=test/convit_ssl/benchmark/linear_eval_micro_folder_in1k"]
    _, config = compose(
        [
            *base,
            *filelist_overrides(digits_filelists, "labels"),
            "config.DATA.TRAIN.DATA_SOURCES=[disk_filelist]",
            "config.DATA.TRAIN.LABEL_SOURCES=[disk_filelist]",
            "config.DATA.TEST.DATA_SOURCES=[disk_filelist]",
            "config.DATA.TEST.LABEL_SOURCES=[disk_filelist]",
            f"config.DATA.TRAIN.LABEL_PATHS=[{tmp_path / 'missing_labels.npy'}]",
        ]
    )
    with pytest.raises(
        FileNotFoundError, match=r"labels of .* \(disk_filelist\): label file .*missing_labels.npy.* does not exist"
    ):
        validate(config)


def _check_folder(root, *overrides):
    _, config = compose([FOLDER, *folder_overrides(root), *overrides])
    validate(config)


# The run folder: writable, and not another run's.


@pytest.fixture
def read_only_folder(tmp_path):
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as folder:
        yield folder


def test_read_only_output_folder_refused_before_launch(read_only_folder, tmp_path):
    proc = run_engine(
        [MICRO, f"config.CHECKPOINT.DIR={read_only_folder}/ck"], cwd=tmp_path, check=False, timeout=120
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        f"convit-ssl run: error: config.CHECKPOINT.DIR={read_only_folder}/ck cannot be written (Read-only file "
        "system): expected a folder this user can create and write"
    ]


def test_output_folder_through_a_file_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    _, config = compose([MICRO, f"config.CHECKPOINT.DIR={tmp_path}/a_file/ck"])
    with pytest.raises(ValueError, match=r"a_file/ck cannot be written \(Not a directory\): expected a folder"):
        output_folder.check(config)


def test_missing_output_folder_is_created(tmp_path):
    _, config = compose([MICRO, f"config.CHECKPOINT.DIR={tmp_path}/new/ck"])
    output_folder.check(config)
    assert (tmp_path / "new" / "ck").is_dir() and not any((tmp_path / "new" / "ck").iterdir())  # no probe left


def test_relaunch_into_another_runs_folder_refused(tmp_path):
    """A folder with checkpoints and the train_config.yaml of a run: the same run
    relaunches (auto-resume), a run of another model or method is refused and
    writes nothing."""
    checkpoint_dir = tmp_path / "ck"
    first = [MICRO, f"config.CHECKPOINT.DIR={checkpoint_dir}"]
    launcher.prepare(first)  # writes train_config.yaml, as a launch does
    (checkpoint_dir / "model_phase0.torch").write_bytes(b"a checkpoint of that run")
    saved = (checkpoint_dir / "train_config.yaml").read_text()

    launcher.prepare([*first, "config.OPTIMIZER.num_epochs=4", f"{TRUNK}.DROP_PATH_RATE=0.0"])  # the same run, longer
    for change, named in [
        (f"{TRUNK}.DEPTH=4", r"MODEL\.TRUNK\.CONVIT_SSL\.DEPTH: 3 there, 4 here"),
        (
            "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,7]}]]",
            r"MODEL\.HEAD\.PARAMS: .*\[48, 10\].* there, .*\[48, 7\].* here",
        ),
        ("config.TRAINER.TASK_NAME=convit_ssl_task", r"TRAINER\.TASK_NAME: 'self_supervision_task' there"),
    ]:
        (checkpoint_dir / "train_config.yaml").write_text(saved)
        with pytest.raises(
            ValueError, match=rf"config\.CHECKPOINT\.DIR=.*/ck holds the checkpoints of another run \({named}"
        ):
            launcher.prepare([*first, change])
        assert (checkpoint_dir / "train_config.yaml").read_text() == saved  # nothing overwritten
    assert (checkpoint_dir / "model_phase0.torch").read_bytes() == b"a checkpoint of that run"
