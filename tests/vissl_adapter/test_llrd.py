"""Layer-wise lr decay (convit_ssl/vissl/training/llrd.py) in process: every parameter's
rate against the one its layer should get, through VISSL's schedule, resume and
convit_ssl's one training task; its config errors."""

from __future__ import annotations

import re

import pytest
import torch

from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.training import llrd
from convit_ssl.vissl.training.task import ConViTSSLTask

TWINS = "test/convit_ssl/benchmark"


def _expected_layer(name: str, depth: int) -> int:
    """The layer of a VISSL model's parameter (trunk.* / heads.*) by its name."""
    if name.startswith(("trunk.patch_embed.", "trunk.cls_token", "trunk.pos_embed")):
        return 0
    match = re.match(r"trunk\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    assert name.startswith(("trunk.norm.", "heads.")), name
    return depth + 1


def _llrd_task(overrides=()):
    from classy_vision.optim import build_optimizer, build_optimizer_schedulers
    from classy_vision.tasks import TASK_REGISTRY
    from vissl.models import build_model

    _, config = compose([f"config={TWINS}/finetune_micro_folder_cifar100_384_llrd", *overrides])
    task = TASK_REGISTRY[config.TRAINER.TASK_NAME].from_config(config)
    torch.manual_seed(0)
    task.base_model = build_model(config.MODEL, config.OPTIMIZER)
    task.optimizer = build_optimizer(config.OPTIMIZER)
    task.optimizer_schedulers = build_optimizer_schedulers(config.OPTIMIZER)
    task.prepare_optimizer()
    return config, task


def test_layer_decay_rates_survive_the_schedule():
    config, task = _llrd_task()
    assert isinstance(task, ConViTSSLTask)
    model, optimizer = task.base_model, task.optimizer
    depth, decay = config.MODEL.TRUNK.CONVIT_SSL.DEPTH, config.OPTIMIZER.layer_decay
    schedule = task.optimizer_schedulers["lr"]
    names = {id(p): n for n, p in model.named_parameters()}
    # Every trainable parameter is in exactly one group.
    grouped = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)

    non_regularized = ("pos_embed", "cls_token", "gating_param")
    for where in (0.0, 0.3, 0.9):
        model.zero_grad()
        sum(out.sum() for out in model(torch.randn(2, 3, 48, 48))).backward()
        optimizer.step(where=where)  # sets every group's lr from its scheduler, then steps
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[id(param)]
                layer = _expected_layer(name, depth)
                assert group["layer_id"] == layer, name
                assert group["lr"] == pytest.approx(schedule(where) * decay ** (depth + 1 - layer), rel=1e-12), name
                # VISSL's regularized / unregularized split is kept
                no_decay = param.ndim == 1 or any(k in name for k in non_regularized)
                assert group["weight_decay"] == (0.0 if no_decay else config.OPTIMIZER.weight_decay), name
        # what VISSL's TensorBoard hook logs: one float, the schedule's value
        assert optimizer.options_view.lr == pytest.approx(schedule(where))
    patch = next(g for g in optimizer.param_groups if g["layer_id"] == 0)
    assert patch["lr"] == pytest.approx(schedule(0.9) * 0.65**4)

    # Resuming: a new task builds the same groups, so the checkpointed optimizer state loads.
    _, resumed = _llrd_task()
    resumed.optimizer.set_classy_state(optimizer.get_classy_state())
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_layer_decay_one_is_vissls_rates():
    _, task = _llrd_task(["config.OPTIMIZER.layer_decay=1.0"])
    schedule = task.optimizer_schedulers["lr"]
    sum(out.sum() for out in task.base_model(torch.randn(2, 3, 48, 48))).backward()
    task.optimizer.step(where=0.5)
    assert {g["lr"] for g in task.optimizer.param_groups} == {schedule(0.5)}


def test_layer_decay_combines_with_repeated_augmentation():
    """One task, every option independent: the shipped llrd override plus repeated augmentation."""
    from convit_ssl.vissl.run.validate import validate_task

    _, config = compose(
        [f"config={TWINS}/finetune_micro_folder_cifar100_384_llrd", "+config.DATA.TRAIN.REPEATED_AUGMENTATIONS=2"]
    )
    assert config.TRAINER.TASK_NAME == "convit_ssl_task" and config.OPTIMIZER.layer_decay == 0.65
    validate_task(config)
    llrd.validate_layer_decay(config)
    _, task = _llrd_task(["+config.DATA.TRAIN.REPEATED_AUGMENTATIONS=2"])
    assert len({g["lr_scale"] for g in task.optimizer.param_groups}) > 1


def test_layer_decay_config_errors():
    _, plain = compose([f"config={TWINS}/finetune_micro_folder_cifar100_384"])
    llrd.validate_layer_decay(plain)  # no key, VISSL's task: fine
    plain.OPTIMIZER.layer_decay = 0.65
    with pytest.raises(ValueError, match="layer_decay=0.65 needs config.TRAINER.TASK_NAME=convit_ssl_task"):
        llrd.validate_layer_decay(plain)
    _, config = compose([f"config={TWINS}/finetune_micro_folder_cifar100_384_llrd"])
    llrd.validate_layer_decay(config)
    for bad in (0, 1.5, True, "0.65"):
        config.OPTIMIZER.layer_decay = bad
        with pytest.raises(ValueError, match=r"layer_decay must be a number in \(0, 1\]"):
            llrd.validate_layer_decay(config)
    config.OPTIMIZER.layer_decay = None
    llrd.validate_layer_decay(config)  # null under convit_ssl_task: VISSL's groups
    config.OPTIMIZER.layer_decay = 0.65
    config.TRAINER.TASK_NAME = "convit_ssl_no_such_task"
    with pytest.raises(ValueError, match="'convit_ssl_no_such_task' is not a registered task"):
        llrd.validate_layer_decay(config)


def test_layer_of_an_unknown_parameter_is_an_error():
    assert [llrd.trunk_layer_id(n, 3) for n in ("pos_embed", "blocks.2.attn.qkv.weight", "norm.bias")] == [0, 3, 4]
    with pytest.raises(ValueError, match="'blocks.3.mlp.fc1.weight' has no layer"):
        llrd.trunk_layer_id("blocks.3.mlp.fc1.weight", 3)
    with pytest.raises(ValueError, match="layer-wise lr decay .*: no convit_ssl ConViT in the model"):
        llrd.layer_ids(torch.nn.Linear(2, 2))
