"""timm's model interface on ConViT, checked against timm's own ConVit of the
same shape: the classifier calls, the parameter groups of timm's layer-wise lr
decay, the data config timm reads, the pooling options, feature_info."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2

from convit_ssl.models import create_model
from helpers import perturb_

TIMM = dict(img_size=32, patch_size=8, depth=4, local_up_to_layer=2, num_classes=5)  # timm's convit_tiny: 4 x 48
OURS = dict(img_size=32, patch_size=8, depth=4, num_gpsa_layers=2, num_classes=5)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    theirs = timm.create_model("convit_tiny", **TIMM)
    perturb_(theirs, seed + 1)
    ours = create_model("convit_tiny", **OURS)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _groups(model):
    """(lr scale, weight decay, parameter names) of each group timm's factory makes."""
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    return sorted(
        (round(g["lr_scale"], 9), g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
        for g in optimizer.param_groups
    )


def test_layer_decay_groups_equal_timms():
    theirs, ours = _pair()
    groups = _groups(ours)
    assert groups == _groups(theirs)
    assert len(groups) == 2 * (4 + 2)  # (stem, 4 blocks, norm + head) x (decay, no decay)
    assert {names[0] for _, _, names in groups if names[0].startswith("blocks.0.")}  # blocks are their own layers


@pytest.mark.parametrize("pool", ["token", "avg", ""])
def test_pooling_and_classifier_calls_match_timm(pool):
    theirs, ours = _pair(1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    theirs.reset_classifier(3, global_pool=pool)
    ours.reset_classifier(3, global_pool=pool)
    assert ours.get_classifier().out_features == theirs.get_classifier().out_features == 3
    ours.get_classifier().load_state_dict(theirs.get_classifier().state_dict())
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5
        assert (
            ours.forward_head(ours.forward_features(x), pre_logits=True)
            - theirs.forward_head(theirs.forward_features(x), pre_logits=True)
        ).abs().max().item() <= 1e-5
    assert ours.num_prefix_tokens == theirs.num_prefix_tokens == 1
    assert ours.num_classes == 3 and ours.pretrained_cfg["num_classes"] == 3
    with pytest.raises(ValueError, match="global_pool"):
        ours.reset_classifier(3, global_pool="max")


def test_reset_classifier_then_a_training_step():
    """timm's fine-tuning start: a new head of 4 classes, then one AdamW step
    that lowers the loss on the batch; the head keeps the model's mode."""
    _, ours = _pair(2)
    ours.train()
    ours.reset_classifier(4)
    assert ours.get_classifier().training and ours.get_classifier().weight.shape == (4, ours.num_features)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    y = torch.arange(8) % 4
    optimizer = create_optimizer_v2(ours, "adamw", lr=1e-3, layer_decay=0.65)
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(ours(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    ours.reset_classifier(0)
    assert isinstance(ours.get_classifier(), torch.nn.Identity) and ours(x).shape == (8, ours.num_features)


def test_data_config_and_feature_info_match_timm():
    """The same preprocessing as timm's convit_tiny; the input size is the one the
    model was built for (timm keeps its pretrained tag's 224 for a 32 px model)."""
    theirs, ours = _pair()
    data, timm_data = resolve_data_config({}, model=ours), resolve_data_config({}, model=theirs)
    assert data.pop("input_size") == (3, 32, 32) and timm_data.pop("input_size") == (3, 224, 224)
    assert data == timm_data
    assert ours.default_cfg is ours.pretrained_cfg
    assert ours.feature_info == theirs.feature_info
    assert ours.group_matcher() == theirs.group_matcher()


def test_data_config_of_a_hub_folder_is_the_weights(tmp_path):
    """A hub folder's pretrained_cfg (the converter writes the source's
    preprocessing into it) becomes the loaded model's: timm reads it back."""
    import json

    from convit_ssl import load_model
    from convit_ssl.checkpoints.hub import write_hub_folder

    _, ours = _pair()
    config = {
        "architecture": "convit_tiny",
        "num_classes": 5,
        "num_features": 192,
        "global_pool": "token",
        "model_args": {"img_size": 32, "patch_size": 8, "depth": 4, "local_up_to_layer": 2},
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "mean": [0.3, 0.3, 0.3],
            "std": [0.4, 0.4, 0.4],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
        },
    }
    folder = tmp_path / "hub"
    folder.mkdir()
    write_hub_folder(folder, ours.state_dict(), config)
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.3, 0.3, 0.3]
    loaded, _ = load_model(folder, keep_head=True)
    data = resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == (0.3, 0.3, 0.3) and data["std"] == (0.4, 0.4, 0.4)
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    timm_data = resolve_data_config({}, model=timm.create_model(f"local-dir:{folder}", pretrained=True))
    assert data == {k: tuple(v) if isinstance(v, list) else v for k, v in timm_data.items()}  # timm keeps JSON lists
