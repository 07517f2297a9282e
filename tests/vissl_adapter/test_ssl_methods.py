"""Self-supervised pretraining with ConViT trunks: every method's tiny CPU
twin (configs/config/test/convit_ssl/ssl/) runs end to end through
tools/run_distributed_engines.py, and restates no more of its ImageNet recipe
(configs/config/pretrain/<method>/) than the micro trunk forces. DINO's
multi-crop step puts two resolutions through the trunk, and its teacher has
no stochastic depth."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.vissl.compat import patches
from convit_ssl.vissl.configs import compose
from helpers import run_engine

# twin name -> its ImageNet recipe
RECIPES = {
    "dino_micro_synthetic": "pretrain/dino/dino_convit_small_in1k_224_300ep",
    "moco_micro_synthetic": "pretrain/moco/moco_convit_small_in1k_224_300ep",
    "swav_micro_synthetic": "pretrain/swav/swav_convit_small_in1k_224_300ep",
    "simclr_micro_synthetic": "pretrain/simclr/simclr_convit_small_in1k_224_300ep",
    "barlow_twins_micro_synthetic": "pretrain/barlow_twins/barlow_twins_convit_small_in1k_224_300ep",
    "deepclusterv2_micro_synthetic": "pretrain/deepcluster_v2/deepclusterv2_convit_small_in1k_224_300ep",
}
TWIN_DIR = "test/convit_ssl/ssl"
# VISSL's swav_head (DINO's head) uses torch.nn.utils.weight_norm, deprecated in torch 2.
WEIGHT_NORM_WARNING = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def _config(name: str) -> Any:
    return compose([f"config={name}"])[1]


# ----------------------------------------------------------------------------
# End to end: every twin trains, checkpoints, and logs a finite loss.
# ----------------------------------------------------------------------------


def _check_dino(state: dict[str, Any], stdout: str) -> None:
    """12 crops per image; the loss state keeps the EMA teacher (to resume) with the student's keys."""
    assert "'num_crops': 12" in stdout
    student = state["base_model"]["model"]
    prefix = "momentum_teacher."
    teacher = {k[len(prefix) :]: v for k, v in state["loss"].items() if k.startswith(prefix)}
    assert set(teacher) == {f"trunk.{k}" for k in student["trunk"]} | {f"heads.{k}" for k in student["heads"]}
    assert not torch.equal(teacher["trunk.pos_embed"], student["trunk"]["pos_embed"])  # an average, not a copy
    assert torch.isfinite(state["loss"]["center"]).all()


def _check_moco(state: dict[str, Any], stdout: str) -> None:
    """The key encoder was built and every step's keys entered the queue."""
    assert int(state["loss"]["queue_ptr"]) == 12  # 3 steps x 4 keys
    assert any(k.startswith("moco_encoder.trunk.") for k in state["loss"])


def _check_swav(state: dict[str, Any], stdout: str) -> None:
    """8 crops per image; prototypes frozen for one step, then L2-normalised after each update."""
    assert "'num_crops': 8" in stdout and "No parameters grad removed from now on: 1" in stdout
    prototypes = state["base_model"]["model"]["heads"]["0.prototypes0.weight"]
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(len(prototypes)), atol=1e-5)


def _check_simclr(state: dict[str, Any], stdout: str) -> None:
    assert "'effective_batch_size': 8" in stdout  # 2 views x 4 images x 1 process


def _check_barlow_twins(state: dict[str, Any], stdout: str) -> None:
    assert "BarlowTwinsLoss" in stdout


def _check_deepclusterv2(state: dict[str, Any], stdout: str) -> None:
    """The memory bank was filled, then clustered at the start of both epochs."""
    assert stdout.count("clustering of the memory bank done") == 2
    assignments = state["loss"]["assignments"]
    assert assignments.shape == (3, 12) and (assignments >= 0).all() and (assignments < 8).all()


METHOD_CHECKS = {
    "dino_micro_synthetic": _check_dino,
    "moco_micro_synthetic": _check_moco,
    "swav_micro_synthetic": _check_swav,
    "simclr_micro_synthetic": _check_simclr,
    "barlow_twins_micro_synthetic": _check_barlow_twins,
    "deepclusterv2_micro_synthetic": _check_deepclusterv2,
}


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    """`twin_run(name)`: (checkpoint folder, output) of the twin, trained once per module."""
    runs = {}

    def run(twin: str):
        if twin not in runs:
            folder = tmp_path_factory.mktemp(twin)
            proc = run_engine([f"config={TWIN_DIR}/{twin}", f"config.CHECKPOINT.DIR={folder / 'ck'}"], cwd=folder)
            runs[twin] = folder / "ck", proc.stdout
        return runs[twin]

    return run


def _final(checkpoint_dir, twin: str):
    return (
        checkpoint_dir / f"model_final_checkpoint_phase{_config(f'{TWIN_DIR}/{twin}').OPTIMIZER.num_epochs - 1}.torch"
    )


@pytest.mark.parametrize("twin", sorted(RECIPES))
def test_twin_trains_end_to_end(twin, twin_run):
    checkpoint_dir, stdout = twin_run(twin)
    config = _config(f"{TWIN_DIR}/{twin}")
    epochs = config.OPTIMIZER.num_epochs
    final = _final(checkpoint_dir, twin)
    assert final.is_file()
    losses = run_folder.losses(checkpoint_dir)
    iterations = epochs * config.DATA.TRAIN.DATA_LIMIT // config.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    assert len(losses) == iterations, losses
    assert all(math.isfinite(loss) for loss in losses), losses
    state = torch.load(final, map_location="cpu", weights_only=False)["classy_state_dict"]
    METHOD_CHECKS[twin](state, stdout)


# ----------------------------------------------------------------------------
# The momentum teacher of DINO and MoCo runs, for conversion and evaluation.
# ----------------------------------------------------------------------------


def _networks(final, where: str):
    """(teacher trunk, student trunk) of a twin's checkpoint, read from VISSL's own layout."""
    state = torch.load(final, map_location="cpu", weights_only=True)["classy_state_dict"]
    prefix = f"{where}.trunk."
    teacher = {k[len(prefix) :]: v for k, v in state["loss"].items() if k.startswith(prefix)}
    return teacher, state["base_model"]["model"]["trunk"]


@pytest.mark.parametrize(
    "twin, where", [("dino_micro_synthetic", "momentum_teacher"), ("moco_micro_synthetic", "moco_encoder")]
)
def test_converter_reads_the_momentum_teacher(twin, where, twin_run, tmp_path):
    from convit_ssl.checkpoints.convert import ConvertConfig
    from convit_ssl.cli.convert import run

    final = _final(twin_run(twin)[0], twin)
    teacher, student = _networks(final, where)
    assert any(not torch.equal(teacher[k], student[k]) for k in student)  # an average of the students, not a copy
    for network, expected in (("teacher", teacher), ("student", student)):
        out = tmp_path / f"{network}.pth"
        report = run(
            ConvertConfig(input=str(final), output=str(out), target_format="timm", keep_head=False, network=network),
            log=lambda _: None,
        )
        converted = torch.load(out, weights_only=True)
        assert set(converted) == set(expected) and all(torch.equal(converted[k], expected[k]) for k in expected)
        assert ("the momentum teacher (network=teacher)" in report["notes"]) == (network == "teacher")


def test_linear_evaluation_of_the_dino_teacher(twin_run, tmp_path):
    """MODEL.WEIGHTS_INIT.NETWORK=teacher: the frozen trunk of the probe is the teacher."""
    final = _final(twin_run("dino_micro_synthetic")[0], "dino_micro_synthetic")
    teacher, _ = _networks(final, "momentum_teacher")
    checkpoint_dir = tmp_path / "ck"
    proc = run_engine(
        [
            "config=test/convit_ssl/linear_eval_micro_synthetic",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={final}",
            "config.MODEL.WEIGHTS_INIT.NETWORK=teacher",
            f"config.CHECKPOINT.DIR={checkpoint_dir}",
        ],
        cwd=tmp_path,
    )
    assert "the momentum teacher (MODEL.WEIGHTS_INIT.NETWORK=teacher)" in proc.stdout
    probe = torch.load(checkpoint_dir / "model_final_checkpoint_phase0.torch", weights_only=True)
    trunk = probe["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert set(trunk) == {f"base_model.{k}" for k in teacher}
    assert all(torch.equal(trunk[f"base_model.{k}"], v) for k, v in teacher.items())


def test_teacher_of_a_run_without_one_is_refused_before_launch(twin_run, tmp_path):
    final = _final(twin_run("simclr_micro_synthetic")[0], "simclr_micro_synthetic")
    proc = run_engine(
        [
            "config=test/convit_ssl/finetune_micro_synthetic",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={final}",
            "config.MODEL.WEIGHTS_INIT.NETWORK=teacher",
            f"config.CHECKPOINT.DIR={tmp_path / 'ck'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "has no momentum teacher" in proc.stdout and "Use network=student" in proc.stdout
    assert not (tmp_path / "ck" / "weights_init").exists()


def test_shipped_benchmark_configs_name_the_network_they_load():
    for name in (
        "benchmark/linear_image_classification/convit_ssl/linear_convit_small_base",
        "benchmark/fulltune/convit_ssl/finetune_convit_small_base",
        "benchmark/nearest_neighbor/convit_ssl/knn_convit_small_base",
    ):
        assert _config(name).MODEL.WEIGHTS_INIT.NETWORK == "student", name


# ----------------------------------------------------------------------------
# The twins test the shipped recipes.
# ----------------------------------------------------------------------------

# What a twin may change beyond test/convit_ssl/ssl/micro_cpu.yaml: sizes only.
SIZE_KEYS = {"size", "size_crops", "dims", "num_clusters", "in_channels"}
TWIN_ONLY = {
    "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP",  # iteration counts (checked below)
    "LOSS.barlow_twins_loss.embedding_dim",  # = the shrunk projector's width
    "LOSS.deepclusterv2_loss.num_train_samples",  # = DATA_LIMIT
    "LOSS.deepclusterv2_loss.num_clusters",  # <= DATA_LIMIT
    "OPTIMIZER.num_epochs",
}
# Loss settings VISSL infers from the batch, the world size, the crops and the head.
INFERRED_LOSS_KEYS = {
    "num_crops",
    "output_dim",
    "output_dir",
    "num_prototypes",
    "embedding_dim",
    "BATCHSIZE_PER_REPLICA",
    "effective_batch_size",
    "world_size",
    "local_queue_length",
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _without_sizes(items: list[Any]) -> list[Any]:
    """Transforms or heads with their size arguments removed."""

    def strip(item):
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if k not in SIZE_KEYS}
        if isinstance(item, (list, tuple)):
            return [strip(v) for v in item]
        return item

    return strip(items)


def _micro_cpu_keys() -> set:
    """The keys test/convit_ssl/ssl/micro_cpu.yaml sets, dotted."""
    import yaml

    from convit_ssl.vissl.configs import config_root

    text = (config_root() / "config" / TWIN_DIR / "micro_cpu.yaml").read_text()
    return set(_flatten(yaml.safe_load(text)["config"]))


@pytest.mark.parametrize("twin", sorted(RECIPES))
def test_twin_restates_only_sizes(twin):
    """Composed, a twin differs from its recipe only where micro_cpu.yaml says,
    in sizes, and in what VISSL infers from those (loss sizes, lr scaled to the batch)."""
    twin_config, recipe = _config(f"{TWIN_DIR}/{twin}"), _config(RECIPES[twin])
    flat_twin, flat_recipe = _flatten(twin_config), _flatten(recipe)
    changed = {k for k, v in flat_twin.items() if k not in flat_recipe or flat_recipe[k] != v}
    inferred = {k for k in changed if k.startswith("LOSS.") and k.split(".")[-1] in INFERRED_LOSS_KEYS}
    if recipe.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale:
        inferred |= {k for k in changed if k.startswith("OPTIMIZER.param_schedulers.lr")}
    unexplained = changed - _micro_cpu_keys() - inferred - TWIN_ONLY - {"DATA.TRAIN.TRANSFORMS", "MODEL.HEAD.PARAMS"}
    assert not unexplained, sorted(unexplained)
    # Transforms and heads: the recipe's, with other sizes.
    assert _without_sizes(twin_config.DATA.TRAIN.TRANSFORMS) == _without_sizes(recipe.DATA.TRAIN.TRANSFORMS)
    assert _without_sizes(twin_config.MODEL.HEAD.PARAMS) == _without_sizes(recipe.MODEL.HEAD.PARAMS)
    frozen = [[name for name, _ in c.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP] for c in (twin_config, recipe)]
    assert frozen[0] == frozen[1]


# ----------------------------------------------------------------------------
# DINO: two resolutions per step, a teacher without stochastic depth.
# ----------------------------------------------------------------------------


@WEIGHT_NORM_WARNING
def test_dino_step_puts_two_resolutions_through_the_trunk():
    """The twin's own augmentation and collator make 2 x 32 px + 10 x 16 px
    crops; VISSL's model runs the trunk once per resolution in one forward."""
    from vissl.data.collators import get_collator
    from vissl.data.ssl_transforms import get_transform
    from vissl.data.synthetic_dataset import SyntheticImageDataset
    from vissl.models import build_model

    config = _config(f"{TWIN_DIR}/dino_micro_synthetic")
    transform = get_transform(config.DATA.TRAIN.TRANSFORMS)
    samples = [
        transform(
            {
                "data": [SyntheticImageDataset.generate_image(seed=i, crop_size=64)],
                "label": [i],
                "data_valid": [1],
                "data_idx": [i],
            }
        )
        for i in range(3)
    ]
    collate = get_collator(config.DATA.TRAIN.COLLATE_FUNCTION, config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS)
    crops = collate(samples)["data"][0]
    assert [tuple(c.shape[-2:]) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 10

    model = build_model(config.MODEL, config.OPTIMIZER)
    seen = []
    model.trunk.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    (scores,) = model(crops)[0]
    assert seen == [(6, 3, 32, 32), (30, 3, 16, 16)]  # one step, two trunk passes
    assert scores.shape == (12 * 3, config.LOSS.dino_loss.output_dim)
    scores.sum().backward()
    assert model.trunk.pos_embed.grad is not None


@WEIGHT_NORM_WARNING
def test_dino_teacher_has_no_stochastic_depth():
    """VISSL's DINOHook zeroes only its own ViT's DROP_PATH_RATE; with
    the patch the convit_ssl teacher is built without stochastic depth too."""
    from vissl.hooks.dino_hooks import DINOHook
    from vissl.models import build_model

    from convit_ssl.models.layers import DropPath

    patches.apply()
    config = _config(f"{TWIN_DIR}/dino_micro_synthetic")
    student = build_model(config.MODEL, config.OPTIMIZER)
    assert any(isinstance(m, DropPath) for m in student.modules())
    task = SimpleNamespace(
        config=config,
        model=student,
        device=torch.device("cpu"),
        loss=SimpleNamespace(momentum_teacher=None, checkpoint=None),
    )
    DINOHook()._build_momentum_network(task)
    teacher = task.loss.momentum_teacher
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))


@WEIGHT_NORM_WARNING
def test_dino_head_with_batchnorm_runs_on_cpu(tmp_path):
    """VISSL's DINOHook converted the teacher to SyncBatchNorm unconditionally
    (dino_hooks.py:66-68), which refuses CPU tensors; the patched hook converts on GPUs only."""
    head = (
        "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[48,256,256,64],use_bn:true,activation_name:GELU,"
        "num_clusters:[1024],use_weight_norm_prototypes:true,return_embeddings:false}]]"
    )
    checkpoint_dir = tmp_path / "ck"
    run_engine(
        [f"config={TWIN_DIR}/dino_micro_synthetic", head, f"config.CHECKPOINT.DIR={checkpoint_dir}"], cwd=tmp_path
    )
    state = torch.load(checkpoint_dir / "model_final_checkpoint_phase0.torch", map_location="cpu", weights_only=False)[
        "classy_state_dict"
    ]
    teacher_bn = [
        k for k in state["loss"] if k.startswith("momentum_teacher.heads.0.projection_head") and "running_mean" in k
    ]
    assert teacher_bn, sorted(state["loss"])[:20]  # the teacher's head has BatchNorm layers, and it trained
