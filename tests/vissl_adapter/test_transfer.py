"""The benchmark configs (benchmark/linear_image_classification, benchmark/fulltune):
their heads, features and classes against a table; their tiny twins run end to
end from a supervised checkpoint (linear probes, fine-tuning at a new
resolution, with and without layer-wise lr decay)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.model.trunk import named_features, validate_trunk_config
from helpers import REPO, assert_started_from_resampled, folder_overrides, run_engine

CONFIG_DIR = REPO / "configs" / "config"
LINEAR = "benchmark/linear_image_classification"
FULLTUNE = "benchmark/fulltune"
TWINS = "test/convit_ssl/benchmark"
WIDTH = 432  # ConViT-S

# dataset folder -> (classes, data source, VISSL dataset name)
DATASETS = {
    "imagenet1k": (1000, "disk_folder", "imagenet1k_folder"),
    "places205": (205, "disk_folder", "places205_folder"),
    "inaturalist18": (8142, "disk_filelist", "inaturalist2018_filelist"),
    "voc07": (20, "disk_filelist", "voc2007"),
    "cifar10": (10, "torchvision_dataset", "CIFAR10"),
    "cifar100": (100, "torchvision_dataset", "CIFAR100"),
    "oxford_flowers": (102, "disk_folder", "oxford_flowers_folder"),
    "oxford_pets": (37, "disk_folder", "oxford_pets_folder"),
    "stanford_cars": (196, "disk_folder", "stanford_cars_folder"),
    "dtd": (47, "disk_folder", "dtd_folder"),
    "food101": (101, "disk_folder", "food101_folder"),
    "stl10": (10, "torchvision_dataset", "STL10"),
}
LINEAR_CONFIGS = {
    "imagenet1k": "eval_convit_small_linear_in1k_224",
    "places205": "eval_convit_small_linear_places205_224",
    "inaturalist18": "eval_convit_small_linear_inat18_224",
    "cifar10": "eval_convit_small_linear_cifar10_224",
    "cifar100": "eval_convit_small_linear_cifar100_224",
    "oxford_flowers": "eval_convit_small_linear_flowers102_224",
    "oxford_pets": "eval_convit_small_linear_pets_224",
    "dtd": "eval_convit_small_linear_dtd_224",
    "food101": "eval_convit_small_linear_food101_224",
    "stl10": "eval_convit_small_linear_stl10_224",
}
SVM_CONFIGS = {"voc07": "eval_convit_small_svm_voc07_224"}
FINETUNE_CONFIGS = {
    (folder, size): f"finetune_convit_small_{short}_{size}"
    for folder, short in [
        ("cifar10", "cifar10"),
        ("cifar100", "cifar100"),
        ("oxford_flowers", "flowers102"),
        ("stanford_cars", "cars"),
        ("oxford_pets", "pets"),
        ("inaturalist18", "inat18"),
    ]
    for size in (224, 384)
}
PROBE_FEATURES = ["lastCLS", "concatCLS4", "lastPOOL"]


def _shipped(family: str) -> set:
    """Benchmark configs of a family, without the shared pieces in convit_ssl/."""
    root = CONFIG_DIR / family
    return {
        str(p.relative_to(CONFIG_DIR).with_suffix(""))
        for p in root.rglob("*.yaml")
        if "convit_ssl" not in p.relative_to(root).parts
    }


def _feature_widths(config) -> list:
    """Widths of the config's probe features, from a forward pass of its trunk on the meta device."""
    model = validate_trunk_config(config.MODEL)
    names = [item[0] for item in config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP]
    size = config.MODEL.TRUNK.CONVIT_SSL.IMAGE_SIZE
    features = named_features(model, torch.empty(1, 3, size, size, device="meta"), names)
    return [f.shape[-1] for f in features]


def _check_data(config, folder: str) -> None:
    _, source, name = DATASETS[folder]
    for split in ("TRAIN", "TEST"):
        block = config.DATA[split]
        assert (block.DATA_SOURCES, block.LABEL_SOURCES, block.DATASET_NAMES) == ([source], [source], [name])


# ---------------------------------------------------------------- the table


def test_every_benchmark_config_is_in_the_table():
    listed = {f"{LINEAR}/{d}/{n}" for d, n in {**LINEAR_CONFIGS, **SVM_CONFIGS}.items()}
    assert _shipped(LINEAR) == listed
    assert _shipped(FULLTUNE) == {f"{FULLTUNE}/{d}/{n}" for (d, _), n in FINETUNE_CONFIGS.items()}


@pytest.mark.parametrize("folder", sorted(LINEAR_CONFIGS))
def test_linear_probe_heads_match_features_and_classes(folder):
    _, config = compose([f"config={LINEAR}/{folder}/{LINEAR_CONFIGS[folder]}"])
    classes = DATASETS[folder][0]
    settings = config.MODEL.FEATURE_EVAL_SETTINGS
    assert settings.EVAL_MODE_ON and settings.FREEZE_TRUNK_ONLY and not settings.EXTRACT_TRUNK_FEATURES_ONLY
    assert [item[0] for item in settings.LINEAR_EVAL_FEAT_POOL_OPS_MAP] == PROBE_FEATURES
    assert all(item[1] == ["Identity", []] for item in settings.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
    widths = _feature_widths(config)
    assert widths == [WIDTH, 4 * WIDTH, WIDTH]
    heads = config.MODEL.HEAD.PARAMS
    assert [h[0] for h in heads] == ["eval_mlp"] * 3
    assert [(h[1]["in_channels"], h[1]["dims"]) for h in heads] == [(w, [w, classes]) for w in widths]
    meter = config.METERS.accuracy_list_meter
    assert meter.num_meters == 3 and meter.meter_names == PROBE_FEATURES
    assert max(meter.topk_values) <= classes
    _check_data(config, folder)
    assert config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME == "classy_state_dict"
    assert config.LOSS.name == "cross_entropy_multiple_output_single_target"


def test_voc07_follows_vissls_svm_benchmark():
    _, config = compose([f"config={LINEAR}/voc07/{SVM_CONFIGS['voc07']}"])
    settings = config.MODEL.FEATURE_EVAL_SETTINGS
    assert settings.EVAL_MODE_ON and settings.FREEZE_TRUNK_ONLY and settings.EXTRACT_TRUNK_FEATURES_ONLY
    assert settings.SHOULD_FLATTEN_FEATS
    assert [item[0] for item in settings.LINEAR_EVAL_FEAT_POOL_OPS_MAP] == PROBE_FEATURES
    assert _feature_widths(config) == [WIDTH, 4 * WIDTH, WIDTH]
    _check_data(config, "voc07")
    # VISSL's own voc07 SVM settings
    assert config.SVM.costs.costs_list == [0.01, 0.1, 1.0, 2, 5, 10, 15, 20, 50, 100, 1000]
    assert (config.SVM.loss, config.SVM.penalty, config.SVM.cross_val_folds) == ("squared_hinge", "l2", 3)


@pytest.mark.parametrize("folder,size", sorted(FINETUNE_CONFIGS))
def test_finetune_head_resolution_and_classes(folder, size):
    _, config = compose([f"config={FULLTUNE}/{folder}/{FINETUNE_CONFIGS[folder, size]}"])
    classes = DATASETS[folder][0]
    assert not config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON  # the whole network trains
    assert config.MODEL.HEAD.PARAMS == [["mlp", {"dims": [WIDTH, classes]}]]
    assert config.MODEL.WEIGHTS_INIT.SKIP_LAYERS == ["heads"]
    assert config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME == "classy_state_dict"
    assert config.DATA.TRAIN.COLLATE_FUNCTION == "cutmixup_collator"
    assert config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes == classes
    trunk = config.MODEL.TRUNK.CONVIT_SSL
    assert (trunk.ARCH, trunk.IMAGE_SIZE, trunk.PATCH_SIZE) == ("convit_small", size, 16)
    assert validate_trunk_config(config.MODEL).width == WIDTH
    crops = {
        t["name"]: t["size"]
        for split in ("TRAIN", "TEST")
        for t in config.DATA[split].TRANSFORMS
        if t["name"] in ("RandomResizedCrop", "CenterCrop")
    }
    assert crops == {"RandomResizedCrop": size, "CenterCrop": size}
    _check_data(config, folder)
    assert (
        config.OPTIMIZER.get("layer_decay") is None
    )  # LLRD is an option (configs/config/benchmark/fulltune/convit_ssl/llrd.yaml)


# ---------------------------------------------------------- twins, end to end


@pytest.fixture(scope="module")
def supervised_checkpoint(tmp_path_factory, digits) -> Path:
    """One supervised_micro_folder run (32 px) whose checkpoint every twin starts from."""
    work = tmp_path_factory.mktemp("bench_supervised")
    run_engine(
        [
            "config=test/convit_ssl/supervised_micro_folder",
            *folder_overrides(digits),
            f"config.CHECKPOINT.DIR={work / 'ck'}",
        ],
        cwd=work,
    )
    return work / "ck" / "model_final_checkpoint_phase0.torch"


def _model_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["classy_state_dict"]["base_model"]["model"]


def test_linear_eval_twin(tmp_path, digits, supervised_checkpoint):
    ck = tmp_path / "ck"
    run_engine(
        [
            f"config={TWINS}/linear_eval_micro_folder_in1k",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={supervised_checkpoint}",
            f"config.CHECKPOINT.DIR={ck}",
        ],
        cwd=tmp_path,
    )
    assert set(run_folder.final_accuracies(ck)["test"]) == {"lastCLS", "concatCLS3", "lastPOOL"}
    # The trunk stayed frozen at the supervised weights (feature-eval keys carry `base_model.`).
    before = _model_state(supervised_checkpoint)["trunk"]
    after = {
        k.removeprefix("base_model."): v
        for k, v in _model_state(ck / "model_final_checkpoint_phase0.torch")["trunk"].items()
    }
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_finetune_twin_at_a_new_resolution(tmp_path, digits, supervised_checkpoint):
    ck = tmp_path / "ck"
    run_engine(
        [
            f"config={TWINS}/finetune_micro_folder_cifar100_384",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={supervised_checkpoint}",
            f"config.CHECKPOINT.DIR={ck}",
        ],
        cwd=tmp_path,
    )
    model = _model_state(ck / "model_final_checkpoint_phase0.torch")
    assert model["trunk"]["pos_embed"].shape == (1, 36, 48)
    assert_started_from_resampled(
        model["trunk"]["pos_embed"], _model_state(supervised_checkpoint)["trunk"]["pos_embed"]
    )
    assert model["heads"]["0.clf.0.weight"].shape == (10, 48)
    before = _model_state(supervised_checkpoint)["trunk"]
    assert not torch.equal(model["trunk"]["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])
    assert "test" in run_folder.final_accuracies(ck)


def test_finetune_twin_with_layer_decay(tmp_path, digits, supervised_checkpoint):
    """The LLRD twin through tools/run_distributed_engines.py."""
    ck = tmp_path / "ck"
    proc = run_engine(
        [
            f"config={TWINS}/finetune_micro_folder_cifar100_384_llrd",
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={supervised_checkpoint}",
            f"config.CHECKPOINT.DIR={ck}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert re.search(r"layer-wise lr decay 0\.65: \d+ param groups", proc.stdout)
    state = torch.load(ck / "model_final_checkpoint_phase0.torch", map_location="cpu", weights_only=True)
    groups = state["classy_state_dict"]["optimizer"]["optim"]["param_groups"]
    # The last step's rates: one schedule value times each group's decay ** (4 - layer).
    base = {g["lr"] / 0.65 ** (4 - g["layer_id"]) for g in groups}
    assert max(base) - min(base) <= 1e-9 * max(base) and min(base) > 0
    assert {g["layer_id"] for g in groups} == {0, 1, 2, 3, 4}
