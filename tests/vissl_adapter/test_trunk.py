"""VISSL's named features of the trunk adapter (`convit_ssl.vissl.model.trunk.named_features`:
lastCLS, blkCLS{i}, concatPOOL{n}, lastMAP, ...), against each block's raw
output captured by forward hooks."""

from __future__ import annotations

import pytest
import torch

from convit_ssl.models import create_model
from convit_ssl.vissl.model.trunk import named_features
from helpers import block_outputs


def test_named_features_shapes_and_values(feature_model):
    model = feature_model
    width, grid, batch = 192, (4, 6), 2
    x = torch.randn(batch, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    names = [
        "lastCLS",
        "blkCLS0",
        "blkCLS1",
        "blkCLS2",
        "concatCLS2",
        "concatCLS3",
        "lastPOOL",
        "blkPOOL0",
        "blkPOOL2",
        "concatPOOL2",
        "lastBLK",
        "lastMAP",
    ]
    with torch.no_grad():
        feats = dict(zip(names, named_features(model, x, names)))
        tokens = model.forward_features(x)
    shapes = {n: tuple(f.shape) for n, f in feats.items()}
    assert shapes == {
        "lastCLS": (batch, width),
        "blkCLS0": (batch, width),
        "blkCLS1": (batch, width),
        "blkCLS2": (batch, width),
        "concatCLS2": (batch, 2 * width),
        "concatCLS3": (batch, 3 * width),
        "lastPOOL": (batch, width),
        "blkPOOL0": (batch, width),
        "blkPOOL2": (batch, width),
        "concatPOOL2": (batch, 2 * width),
        "lastBLK": (batch, 1 + 24, width),
        "lastMAP": (batch, width, *grid),
    }
    raw = block_outputs(model, x)
    normed = {i: model.norm(t) for i, t in raw.items()}
    assert raw[0].shape == (batch, 24, width) and raw[2].shape == (batch, 25, width)
    tol = dict(atol=1e-5, rtol=0)
    assert torch.allclose(feats["lastCLS"], tokens[:, 0], **tol)
    assert torch.allclose(feats["lastBLK"], tokens, **tol)
    # GPSA block: no class token yet, its "CLS" is the mean patch token (after the final norm)
    assert torch.allclose(feats["blkCLS0"], normed[0].mean(1), **tol)
    assert torch.allclose(feats["blkCLS1"], normed[1].mean(1), **tol)
    # MHSA block: the class token
    assert torch.allclose(feats["blkCLS2"], normed[2][:, 0], **tol)
    assert torch.allclose(feats["blkCLS2"], feats["lastCLS"], **tol)
    assert torch.allclose(feats["concatCLS2"], torch.cat([feats["blkCLS1"], feats["blkCLS2"]], -1), **tol)
    assert torch.allclose(feats["concatCLS3"], torch.cat([feats[f"blkCLS{i}"] for i in range(3)], -1), **tol)
    assert torch.allclose(feats["lastPOOL"], tokens[:, 1:].mean(1), **tol)
    assert torch.allclose(feats["blkPOOL2"], feats["lastPOOL"], **tol)
    assert torch.allclose(feats["blkPOOL0"], normed[0].mean(1), **tol)
    assert torch.allclose(feats["concatPOOL2"], torch.cat([normed[1].mean(1), normed[2][:, 1:].mean(1)], -1), **tol)
    # lastMAP[:, :, y, x] is patch token y * W + x (row-major)
    fmap = feats["lastMAP"]
    for y, xx in [(0, 0), (1, 5), (3, 2)]:
        assert torch.allclose(fmap[:, :, y, xx], tokens[:, 1 + y * grid[1] + xx], **tol)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(tokens), model(x), **tol)


def test_named_features_order_and_early_stop(feature_model):
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = named_features(feature_model, x, ["blkPOOL1", "blkCLS0"])
        (c,) = named_features(feature_model, x, ["blkCLS0"])
        (blk,) = named_features(feature_model, x, ["lastBLK"])
    assert torch.allclose(b, c, atol=1e-6) and not torch.allclose(a, b)
    assert blk.shape == (1, 25, 192)


def test_bad_feature_names():
    model = create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown feature name 'lastFOO'; valid names: lastCLS"):
        named_features(model, x, ["lastFOO"])
    with pytest.raises(ValueError, match=r"feature 'blkCLS3': block index must be in 0\.\.2"):
        named_features(model, x, ["blkCLS3"])
    with pytest.raises(ValueError, match=r"feature 'concatCLS4': the number of blocks must be in 1\.\.3"):
        named_features(model, x, ["concatCLS4"])
    with pytest.raises(ValueError, match=r"concatPOOL0"):
        named_features(model, x, ["concatPOOL0"])
