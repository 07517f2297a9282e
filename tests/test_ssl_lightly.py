"""tools/ssl_lightly.py trains a method with lightly's loss and heads on the
VISSL run's terms: the same random trunk as VISSL's trainer builds, heads
shaped as the config's VISSL heads, and a short run that trains and measures."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from convit_ssl.vissl.configs import compose, small_scale_config
from helpers import REPO

spec = importlib.util.spec_from_file_location("ssl_lightly", REPO / "tools" / "ssl_lightly.py")
ssl_lightly = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ssl_lightly)

# VISSL's swav_head / DINO head emit [embedding, scores] from one module; lightly splits projection and prototypes.
WEIGHT_NORM_WARNING = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def _config(method: str):
    return compose([f"config={small_scale_config(method)}", "config.SEED_VALUE=1"])[1]


def test_trunk_is_the_one_vissl_builds_at_the_same_seed():
    from vissl.models import build_model

    config = _config("simclr")
    ours = ssl_lightly.build_trunk(config).state_dict()
    from vissl.utils.misc import set_seeds

    set_seeds(config, 0)
    vissl_trunk = build_model(config.MODEL, config.OPTIMIZER).trunk.state_dict()
    assert set(ours) == set(vissl_trunk)
    assert all(torch.equal(ours[k], vissl_trunk[k]) for k in ours)


@WEIGHT_NORM_WARNING
@pytest.mark.parametrize("method", ssl_lightly.METHODS)
def test_lightly_heads_have_the_configs_parameters(method):
    """Every weight of VISSL's head has a lightly counterpart of the same shape, and no more
    (BatchNorm where the config has it, bias-free prototypes and last layers). lightly leaves
    out the bias of a linear layer followed by BatchNorm, which cancels it (its gradient is 0)."""
    from vissl.models import build_model

    config = _config(method)
    trunk = ssl_lightly.build_trunk(config)
    model = ssl_lightly.build_method(method, config, ssl_lightly.ClassToken(trunk))
    ours = sorted(tuple(p.shape) for name, p in model.named_parameters() if not name.startswith("teacher."))
    vissl_heads = build_model(config.MODEL, config.OPTIMIZER).heads
    cancelled = {
        id(a.bias)
        for m in vissl_heads.modules()
        if isinstance(m, torch.nn.Sequential)
        for a, b in zip(m, list(m)[1:])
        if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.BatchNorm1d)
    }
    theirs = sorted(tuple(p.shape) for p in vissl_heads.parameters() if id(p) not in cancelled)
    assert ours == theirs


def test_a_short_moco_run_trains_and_measures(tmp_path, digits):
    """Two iterations of MoCo (momentum encoder, memory bank) on 40 train / 20 val digits
    per class: the kNN record at init is that of the random trunk, the run's is written."""
    data = tmp_path / "digits"
    for split, keep in (("train", 40), ("val", 20)):
        for folder in sorted((digits / split).iterdir()):
            (data / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:keep]:
                shutil.copy(image, data / split / folder.name / image.name)
    out = tmp_path / "out"
    assert (
        ssl_lightly.main(
            [
                "--method",
                "moco",
                "--seeds",
                "0",
                "--data",
                str(data),
                "--out",
                str(out),
                "--override",
                "config.OPTIMIZER.num_epochs=1",
            ]
        )
        == 0
    )
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["iterations"] == 400 // 128 and run["knn_curve"][0] == [0, run["knn_top1"]["random_init"]]
    assert 20.0 < run["knn_top1"]["random_init"] < 95.0 and "teacher" in run["knn_top1"]
    assert run["final_loss"] > 0
