"""The supervised recipe pieces VISSL lacks (repeated augmentation, class-balanced
subsets), the recipe's weight-decay groups, and the recipe's tiny twins through VISSL."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import torch

from convit_ssl.checkpoints import run_folder
from convit_ssl.data.subsets import subset_indices
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.run.validate import validate
from helpers import folder_overrides, run_engine

RECIPE_TWIN = "config=test/convit_ssl/recipe/supervised_recipe_micro_folder"


# ----------------------------------------------------------------- subsets
def test_first_per_class_takes_the_first_images_of_each_class():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    chosen = subset_indices(labels, 0.3)
    assert chosen.tolist() == [0, 1, 2, 10, 11]  # int(10*.3)=3, int(7*.3)=2, int(3*.3)=0
    assert subset_indices(labels, 1.0).tolist() == list(range(20))


def test_random_per_class_is_seeded_and_balanced():
    labels = np.repeat(np.arange(5), 40)
    a, b = (
        subset_indices(labels, 0.25, "random_per_class", seed=3),
        subset_indices(labels, 0.25, "random_per_class", seed=3),
    )
    c = subset_indices(labels, 0.25, "random_per_class", seed=4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert np.bincount(labels[a]).tolist() == [10] * 5
    assert len(set(a.tolist())) == len(a)


@pytest.mark.parametrize(
    "fraction, mode, match",
    [
        (0.0, "first_per_class", r"fraction must be in \(0, 1\]"),
        (1.5, "first_per_class", r"fraction must be in \(0, 1\]"),
        (0.5, "stratified", r"mode 'stratified' is not one of first_per_class, random_per_class"),
    ],
)
def test_subset_bad_input(fraction, mode, match):
    with pytest.raises(ValueError, match=match):
        subset_indices([0, 1], fraction, mode)


# ----------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group: VISSL's samplers need torch.distributed initialised."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _sampler(dataset_size, indices=None, repeats=1, world=1, rank=0, batch=4, seed=0):
    from convit_ssl.vissl.training.task import ConViTSampler

    return ConViTSampler(list(range(dataset_size)), batch, seed, indices, repeats, num_replicas=world, rank=rank)


def test_repeated_augmentation_spreads_copies_over_ranks(process_group):
    world, repeats, n = 3, 3, 30
    per_rank = [list(_sampler(n, repeats=repeats, world=world, rank=r)) for r in range(world)]
    assert [len(p) for p in per_rank] == [n // world] * world  # the epoch keeps its length
    # Copies k of one image are consecutive in the stream, so they go to different ranks:
    # position i of every rank holds the same image (world == repeats).
    for i in range(n // world):
        assert len({p[i] for p in per_rank}) == 1
    seen = np.bincount(np.concatenate(per_rank), minlength=n)
    assert sorted(set(seen.tolist())) == [0, 3]  # a third of the images, each three times
    assert (seen == 3).sum() == n // repeats


def test_sampler_is_deterministic_and_reshuffles_per_epoch(process_group):
    a, b = _sampler(50, repeats=2), _sampler(50, repeats=2)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_sampler_subset_and_resume(process_group):
    indices = np.arange(0, 40, 2)
    sampler = _sampler(40, indices=indices, batch=4)
    full = list(sampler)
    assert sorted(full) == indices.tolist() and len(sampler) == 20
    sampler.set_start_iter(2)
    assert list(sampler) == full[8:]  # resuming mid-epoch skips 2 batches of 4


def test_sampler_keys_need_the_convit_task():
    _, config = compose([RECIPE_TWIN, "config.TRAINER.TASK_NAME=self_supervision_task"])
    with pytest.raises(ValueError, match=r"need config\.TRAINER\.TASK_NAME=convit_ssl_task"):
        validate(config)
    _, config = compose([RECIPE_TWIN, "+config.DATA.TRAIN.SUBSET.FRACTON=0.1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['FRACTON'\] in config\.DATA\.TRAIN\.SUBSET"):
        validate(config)


# ----------------------------------------------------------- weight decay
def test_recipe_weight_decay_groups():
    """AdamW wd 0.05 on weight matrices only: no decay on biases, LayerNorms,
    pos_embed, cls_token and the GPSA gates, through VISSL's own param groups."""
    from vissl.models import build_model
    from vissl.optimizers.optimizer_helper import get_optimizer_param_groups

    _, config = compose(
        [
            "config=pretrain/supervised/supervised_convit_tiny_in1k_224_300ep",
            "config.MODEL.TRUNK.CONVIT_SSL.DEPTH=3",
            "config.MODEL.TRUNK.CONVIT_SSL.NUM_GPSA_LAYERS=2",
        ]
    )
    model = build_model(config.MODEL, config.OPTIMIZER)
    groups = get_optimizer_param_groups(model, config.MODEL, config.OPTIMIZER, {"lr": 1.0, "lr_head": 1.0})
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in names.values()}  # every parameter in exactly one group
    for name, param in names.items():
        no_decay = (
            name.endswith(".bias")
            or ".norm" in name
            or name.startswith("trunk.norm.")
            or name.split(".")[-1] in {"pos_embed", "cls_token", "gating_param"}
        )
        assert decay[id(param)] == (0.0 if no_decay else 0.05), name
    assert decay[id(names["trunk.blocks.0.attn.pos_proj.weight"])] == 0.05


# ------------------------------------------------------------ lr schedule
def _lr_schedule(recipe, nodes, procs):
    _, config = compose(
        [f"config={recipe}", f"config.DISTRIBUTED.NUM_NODES={nodes}", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}"]
    )
    return config.OPTIMIZER.param_schedulers.lr


def test_recipe_warms_up_from_1e6_however_the_gpus_are_split():
    """The DeiT recipe: 5 epochs of warm-up from 1e-6 to 5e-4 x batch / 512, then
    cosine, for 2 nodes x 8, 1 node x 16 and 1 node x 8 GPUs alike (VISSL alone
    starts the warm-up at one node's lr: 5e-4 for 2 x 8, and drops it on one node)."""
    recipe = "pretrain/supervised/supervised_convit_tiny_in1k_224_300ep"
    schedules = {split: _lr_schedule(recipe, *split) for split in ((2, 8), (1, 16), (1, 8))}
    for (nodes, procs), lr in schedules.items():
        warmup, cosine = lr["schedulers"]
        peak = 0.0005 * nodes * procs * 64 / 512
        assert lr["name"] == "composite" and warmup["name"] == "linear" and cosine["name"] == "cosine"
        assert warmup["start_value"] == pytest.approx(1e-6) and warmup["end_value"] == pytest.approx(peak)
        assert cosine["start_value"] == pytest.approx(peak)
    assert schedules[(2, 8)] == schedules[(1, 16)]


def test_vissl_warmup_rule_stays_for_other_schedules():
    """Without keep_warmup_start (the self-supervised recipes, which say so), VISSL's rule applies."""
    lr = _lr_schedule("pretrain/simclr/simclr_convit_small_in1k_224_300ep", 2, 8)
    assert lr["schedulers"][0]["start_value"] == pytest.approx(
        0.0005 * 8 * 64 / 512
    )  # one node's lr, not the 0.0 written


# ------------------------------------------------------------ engine twins
def test_recipe_twin_runs(digits, tmp_path):
    proc = run_engine(
        [RECIPE_TWIN, *folder_overrides(digits), f"config.CHECKPOINT.DIR={tmp_path / 'ck'}"], cwd=tmp_path
    )
    assert "repeated augmentation x3" in proc.stdout
    assert (tmp_path / "ck" / "model_final_checkpoint_phase0.torch").is_file()
    losses = run_folder.losses(tmp_path / "ck")
    assert len(losses) == 96 // 8 and all(np.isfinite(losses)), losses  # every iteration (LOG_FREQUENCY: 1)


def test_subset_twin_trains_on_the_subset(digits, tmp_path):
    proc = run_engine(
        [
            "config=test/convit_ssl/recipe/supervised_subset_micro_folder",
            *folder_overrides(digits),
            f"config.CHECKPOINT.DIR={tmp_path / 'ck'}",
        ],
        cwd=tmp_path,
    )
    # digits train split: 1438 images, 10 classes of 142-146: int(n_c * 0.1) = 14 each, minus one
    assert re.search(r"convit_ssl sampler: 139 of 1438 images", proc.stdout)  # the user is told
    assert (tmp_path / "ck" / "model_final_checkpoint_phase1.torch").is_file()
    assert len(run_folder.losses(tmp_path / "ck")) == 2 * (139 // 8)  # 2 epochs of the subset (all 1438: 2 x 179)
