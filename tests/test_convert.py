"""Tests of the checkpoint converter (convit_ssl.checkpoints.convert through convit_ssl.cli.convert, tools/convert_checkpoint.py,
`convit-ssl convert`): round trips between the formats, real shapes, heads,
resampling, safety and the command line. CPU only; every file lives in tmp_path.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from convit_ssl import create_model
from convit_ssl.checkpoints import io as ckpt_io
from convit_ssl.checkpoints.convert import ConvertConfig
from convit_ssl.checkpoints.io import CheckpointError
from convit_ssl.checkpoints.vissl_convit import VISSL_CONVIT_NORM_EPS, vissl_convit_to_timm
from convit_ssl.cli.convert import load_config, run
from convit_ssl.vissl.model.trunk import named_features
from helpers import REPO

TOOL = REPO / "tools" / "convert_checkpoint.py"
TINY = dict(img_size=32, patch_size=8, width=48, depth=3, num_gpsa_layers=2)
CLASSES = 5


# --------------------------------------------------------------------------- helpers
def _quiet(_: str) -> None:
    pass


def _convert(inp: Path, out: Path, **fields: Any) -> dict[str, Any]:
    return run(ConvertConfig(input=str(inp), output=str(out), **fields), log=_quiet)


def _perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor perturbed (looks trained:
    no zero biases, no unit norms, gates spread)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v + scale * torch.randn(v.shape, generator=gen)
            if k.endswith("gating_param"):
                v = v + torch.randn(v.shape, generator=gen)
        out[k] = v.contiguous()
    return out


def _tiny_state(num_classes: int = CLASSES, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _perturbed(create_model("convit_tiny", **{**TINY, **overrides}, num_classes=num_classes), seed)


def _tiny_model(state: dict[str, torch.Tensor], num_classes: int = 0, **overrides) -> torch.nn.Module:
    model = create_model("convit_tiny", **{**TINY, **overrides}, num_classes=num_classes)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _split(timm_sd: dict[str, torch.Tensor]):
    trunk = {k: v for k, v in timm_sd.items() if not k.startswith("head.")}
    heads = {f"0.clf.0.{k[5:]}": v for k, v in timm_sd.items() if k.startswith("head.")}
    return trunk, heads


def _vissl(trunk: dict[str, torch.Tensor], heads: dict[str, torch.Tensor] | None = None, prefix: str = "") -> dict:
    return {
        "classy_state_dict": {
            "base_model": {"model": {"trunk": {prefix + k: v for k, v in trunk.items()}, "heads": dict(heads or {})}}
        }
    }


def _parts(obj: dict):
    model = obj["classy_state_dict"]["base_model"]["model"]
    return model["trunk"], model["heads"]


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _images(*size, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def _folder(path: Path) -> set:
    return {p.name for p in path.iterdir()}


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    """A perturbed tiny ConViT (32 px, patch 8, width 48, 2 GPSA + 1 MHSA) with a 5-class head."""
    return _tiny_state()


@pytest.fixture(scope="module")
def vissl_convit_trunk():
    """VISSL's own built-in `convit` trunk (same tiny geometry, qkv biases, MLP 100), perturbed."""
    from helpers import vissl_builtin_trunk

    return vissl_builtin_trunk(48, 4, True, 100)


# --------------------------------------------------------------------------- 1. round trips
@pytest.mark.parametrize("keep_head", [True, False], ids=["head", "nohead"])
def test_timm_vissl_timm_is_bit_exact(tmp_path, tiny, keep_head):
    torch.save(tiny, tmp_path / "a.pth")
    r1 = _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl", keep_head=keep_head)
    r2 = _convert(tmp_path / "b.torch", tmp_path / "c.pth", target_format="timm")
    assert (r1["source_format"], r2["source_format"]) == ("timm", "vissl")
    assert r1["max_abs_diff"] < 1e-5 and r2["max_abs_diff"] < 1e-5  # observed 8.9e-8 (4.8e-7 without head)
    trunk, heads = _split(tiny)
    mid_trunk, mid_heads = _parts(_load(tmp_path / "b.torch"))
    _assert_identical(mid_trunk, trunk)
    _assert_identical(mid_heads, heads if keep_head else {})
    _assert_identical(_load(tmp_path / "c.pth"), tiny if keep_head else trunk)
    assert r2["head_classes"] == (CLASSES if keep_head else None)


@pytest.mark.parametrize("keep_head", [True, False], ids=["head", "nohead"])
def test_vissl_timm_vissl_is_bit_exact(tmp_path, tiny, keep_head):
    trunk, heads = _split(tiny)
    torch.save(_vissl(trunk, heads), tmp_path / "a.torch")
    r1 = _convert(tmp_path / "a.torch", tmp_path / "b.pth", target_format="timm", keep_head=keep_head)
    r2 = _convert(tmp_path / "b.pth", tmp_path / "c.torch", target_format="vissl")
    assert r1["max_abs_diff"] < 1e-5 and r2["max_abs_diff"] < 1e-5  # observed 8.9e-8
    mid = _load(tmp_path / "b.pth")
    assert ("head.weight" in mid) == keep_head and ("head.bias" in mid) == keep_head
    got_trunk, got_heads = _parts(_load(tmp_path / "c.torch"))
    _assert_identical(got_trunk, trunk)
    _assert_identical(got_heads, heads if keep_head else {})


def test_timm_vissl_convit_timm_round_trip(tmp_path, tiny):
    """timm -> VISSL's built-in layout -> timm: exact except the pos_proj bias, which is
    multiplied and divided by LOCALITY_DIM (within one fp32 ulp). verify=false on the first
    leg: VISSL's trunk has LayerNorm eps 1e-5, timm 1e-6 (see test_vissl_convit_target_explains_eps)."""
    torch.save(tiny, tmp_path / "a.pth")
    _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl_convit", verify=False)
    vc_trunk, vc_heads = _parts(_load(tmp_path / "b.torch"))
    assert "class_token" in vc_trunk and vc_trunk["blocks.0.attn.pos_proj.weight"].shape == (4, 30)
    report = _convert(tmp_path / "b.torch", tmp_path / "c.pth", target_format="timm")
    assert report["source_format"] == "vissl_convit" and report["max_abs_diff"] < 1e-5  # observed 1.9e-6
    back = _load(tmp_path / "c.pth")
    assert set(back) == set(tiny)
    for k in tiny:
        if k.endswith("pos_proj.bias"):
            torch.testing.assert_close(back[k], tiny[k], rtol=1.2e-7, atol=0)
        else:
            assert torch.equal(back[k], tiny[k]), k


@pytest.mark.parametrize("target", ["vissl", "timm"])
@pytest.mark.parametrize("keep_head", [True, False], ids=["head", "nohead"])
def test_vissl_convit_converts_verified(tmp_path, vissl_convit_trunk, target, keep_head):
    """A checkpoint of VISSL's built-in trunk, verified against VISSL's own implementation.
    Observed max_abs_diff: 1.4e-6 (-> vissl), 1.4e-6 (-> timm; 9.5e-7 source vs target)."""
    sd = vissl_convit_trunk.state_dict()
    gen = torch.Generator().manual_seed(5)
    heads = {
        "0.clf.0.weight": 0.1 * torch.randn(CLASSES, 48, generator=gen),
        "0.clf.0.bias": torch.randn(CLASSES, generator=gen),
    }
    torch.save(_vissl(sd, heads), tmp_path / "vc.torch")
    out = tmp_path / "out"
    report = _convert(tmp_path / "vc.torch", out, target_format=target, keep_head=keep_head)
    assert report["source_format"] == "vissl_convit"
    assert report["model"]["norm_eps"] == VISSL_CONVIT_NORM_EPS
    assert "source vs target" in report["verification"] and report["max_abs_diff"] < 1e-5
    if target == "vissl":
        trunk, got_heads = _parts(_load(out))
        assert set(got_heads) == (set(heads) if keep_head else set())
    else:
        state = _load(out)
        trunk = {k: v for k, v in state.items() if not k.startswith("head.")}
        assert ("head.weight" in state) == keep_head
    _assert_identical(trunk, vissl_convit_to_timm(sd))
    # Independently: our model (eps 1e-5) on the converted trunk gives VISSL's features.
    model = _tiny_model(trunk, qkv_bias=True, mlp_ratio=100 / 48, norm_eps=VISSL_CONVIT_NORM_EPS)
    x = _images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vissl_convit_trunk(x, None)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_official_release_to_vissl(tmp_path, tiny, wrapper):
    """The official release's {"model": sd, ...} (and a DDP {"state_dict": {"module.*"}}) -> vissl."""
    prefix = "module." if wrapper == "state_dict" else ""
    torch.save({wrapper: {prefix + k: v for k, v in tiny.items()}, "epoch": 299}, tmp_path / "release.pth")
    report = _convert(tmp_path / "release.pth", tmp_path / "out.torch", target_format="vissl")
    assert report["source_format"] == "timm" and report["max_abs_diff"] < 1e-5
    assert any(wrapper in note for note in report["notes"])
    trunk, heads = _parts(_load(tmp_path / "out.torch"))
    want_trunk, want_heads = _split(tiny)
    _assert_identical(trunk, want_trunk)
    _assert_identical(heads, want_heads)


# --------------------------------------------------------------------------- 2./3. real shapes
@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    """convit_small at 224 with a 7-class head, random perturbed weights."""
    torch.manual_seed(1)
    return _perturbed(create_model("convit_small", num_classes=7), seed=1)


@pytest.mark.parametrize("arch", ["convit_tiny", "convit_small", "convit_base"])
def test_real_shapes_round_trip(tmp_path, small_state, arch):
    if arch == "convit_small":
        state = small_state
    else:
        torch.manual_seed(2)
        model = create_model(arch, num_classes=10)
        state = model.state_dict()
        del model
    torch.save(state, tmp_path / "a.pth")
    verify = arch == "convit_tiny"
    r1 = _convert(
        tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl", arch=arch, verify=verify, verify_batch=1
    )
    r2 = _convert(
        tmp_path / "b.torch", tmp_path / "c.pth", target_format="timm", arch=arch, verify=verify, verify_batch=1
    )
    assert r1["model"]["img_size"] == 224 and r1["model"]["depth"] == 12 and r1["model"]["num_gpsa_layers"] == 10
    if verify:
        assert r1["max_abs_diff"] < 1e-4 and r2["max_abs_diff"] < 1e-4
    back = _load(tmp_path / "c.pth")
    _assert_identical(back, state)
    del back, state


def test_timm_create_model_loads_converted_vissl(tmp_path, small_state):
    """VISSL checkpoint of a convit_small with a 7-class head -> timm file that
    timm.create_model(checkpoint_path=...) loads; outputs match ours (observed 4.5e-7)."""
    import timm

    trunk, heads = _split(small_state)
    torch.save(_vissl(trunk, heads), tmp_path / "small.torch")
    report = _convert(tmp_path / "small.torch", tmp_path / "small.pth", target_format="timm", verify=False)
    assert report["head_classes"] == 7
    ours = create_model("convit_small", num_classes=7)
    ours.load_state_dict(small_state, strict=True)
    theirs = timm.create_model("convit_small", checkpoint_path=str(tmp_path / "small.pth"), num_classes=7)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 4. heads
def _eval_mlp(width: int = 48, seed: int = 7) -> torch.nn.Module:
    """VISSL's own eval_mlp head (BatchNorm2d + linear), with non-trivial statistics, in eval mode."""
    from vissl.models.heads.linear_eval_mlp import LinearEvalMLP

    from convit_ssl.vissl.configs import compose

    _, cfg = compose(["config=test/convit_ssl/supervised_micro_synthetic"])
    head = LinearEvalMLP(cfg.MODEL, in_channels=width, dims=[width, CLASSES])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.channel_bn.weight.copy_(1 + 0.3 * torch.randn(width, generator=gen))
        head.channel_bn.bias.copy_(0.2 * torch.randn(width, generator=gen))
        head.channel_bn.running_mean.copy_(0.5 * torch.randn(width, generator=gen))
        head.channel_bn.running_var.copy_(0.5 + torch.rand(width, generator=gen))
        for p in head.clf.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return head.eval()


def _eval_mlp_heads(width: int = 48, seed: int = 7) -> dict[str, torch.Tensor]:
    return {f"0.{k}": v for k, v in _eval_mlp(width, seed).state_dict().items()}


def test_eval_mlp_head_is_folded(tmp_path, tiny):
    """timm head == VISSL's eval_mlp module (eval mode) on the lastCLS feature."""
    trunk, _ = _split(tiny)
    head = _eval_mlp()
    heads = {f"0.{k}": v for k, v in head.state_dict().items()}
    assert "0.clf.clf.0.weight" in heads  # VISSL's real layout
    torch.save(_vissl(trunk, heads, prefix="base_model."), tmp_path / "eval.torch")  # linear-eval layout
    report = _convert(tmp_path / "eval.torch", tmp_path / "out.pth", target_format="timm")
    assert report["max_abs_diff"] < 1e-5 and any("eval_mlp" in n for n in report["notes"])
    model = _tiny_model(_load(tmp_path / "out.pth"), num_classes=CLASSES)
    features = _tiny_model(trunk)
    x = _images(32, 32)
    with torch.no_grad():
        feat = named_features(features, x, ["lastCLS"])[0]
        torch.testing.assert_close(model(x), head(feat), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "mlp without bias", "eval_mlp"])
def test_plain_head_reference_is_vissls_head(kind):
    """The converter verifies VISSL heads with `references.vissl_head` (plain PyTorch, no
    VISSL import): it computes what VISSL's own `mlp` / `eval_mlp` module computes."""
    from vissl.models.heads.mlp import MLP

    from convit_ssl.checkpoints.references import vissl_head
    from convit_ssl.vissl.configs import compose

    if kind == "eval_mlp":
        theirs = _eval_mlp()
    else:
        _, cfg = compose(["config=test/convit_ssl/supervised_micro_synthetic"])
        theirs = MLP(cfg.MODEL, dims=[48, CLASSES], use_bias=kind == "mlp").eval()
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ours = vissl_head({f"3.{k}": v for k, v in theirs.state_dict().items()}, index=3)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
        assert not torch.allclose(ours(x), theirs(x + 0.1), atol=1e-3)


def test_two_layer_head_needs_keep_head_false(tmp_path, tiny):
    trunk, _ = _split(tiny)
    gen = torch.Generator().manual_seed(0)
    heads = {
        "0.clf.0.weight": torch.randn(10, 48, generator=gen),
        "0.clf.0.bias": torch.randn(10, generator=gen),
        "0.clf.2.weight": torch.randn(CLASSES, 10, generator=gen),
        "0.clf.2.bias": torch.randn(CLASSES, generator=gen),
    }
    torch.save(_vissl(trunk, heads), tmp_path / "mlp2.torch")
    with pytest.raises(CheckpointError, match="keep_head=false") as info:
        _convert(tmp_path / "mlp2.torch", tmp_path / "out.pth", target_format="timm")
    assert "clf.2.weight" in str(info.value)
    report = _convert(tmp_path / "mlp2.torch", tmp_path / "out.pth", target_format="timm", keep_head=False)
    assert report["head_classes"] is None
    assert not any(k.startswith("head") for k in _load(tmp_path / "out.pth"))


def test_head_index(tmp_path, tiny):
    trunk, heads = _split(tiny)
    second = {"1." + k[2:]: v for k, v in _eval_mlp_heads().items()}
    torch.save(_vissl(trunk, {**heads, **second}), tmp_path / "two.torch")
    with pytest.raises(CheckpointError, match=r"no head 2; heads present: \['0', '1'\]"):
        _convert(tmp_path / "two.torch", tmp_path / "out.pth", target_format="timm", head_index=2)
    _convert(tmp_path / "two.torch", tmp_path / "out.pth", target_format="timm", head_index=0)
    assert torch.equal(_load(tmp_path / "out.pth")["head.weight"], tiny["head.weight"])
    report = _convert(tmp_path / "two.torch", tmp_path / "out1.pth", target_format="timm", head_index=1)
    assert any("eval_mlp head 1" in n for n in report["notes"])


def test_feature_eval_layout_reads_like_the_plain_one(tmp_path, tiny):
    trunk, heads = _split(tiny)
    torch.save(_vissl(trunk, heads, prefix="base_model."), tmp_path / "fe.torch")
    report = _convert(tmp_path / "fe.torch", tmp_path / "out.pth", target_format="timm")
    assert report["source_format"] == "vissl" and report["max_abs_diff"] < 1e-5
    _assert_identical(_load(tmp_path / "out.pth"), tiny)


# --------------------------------------------------------------------------- 5. resampling
def test_resample_image_size(tmp_path, tiny):
    trunk, _ = _split(tiny)
    torch.save(_vissl(trunk), tmp_path / "a.torch")
    report = _convert(tmp_path / "a.torch", tmp_path / "b.torch", target_format="vissl", image_size=48)
    assert "resampling at forward time" in report["verification"]
    assert report["max_abs_diff"] <= 1e-6  # observed 0 (the same resampler)
    assert report["model"]["img_size"] == (48, 48)
    new_trunk, _ = _parts(_load(tmp_path / "b.torch"))
    assert new_trunk["pos_embed"].shape == (1, 36, 48)
    x = _images(48, 48)
    with torch.no_grad():  # independently: the 32 px model run at 48 px resamples the same way
        torch.testing.assert_close(_tiny_model(new_trunk, img_size=48)(x), _tiny_model(trunk)(x), rtol=0, atol=1e-6)


def test_resample_up_then_down_stays_close(tmp_path, tiny):
    """32 -> 64 -> 32 px (grid 4 -> 8 -> 4; bicubic up, antialiased bicubic down) is not
    an identity. With a smooth position embedding (|pos| <= 0.1) the observed errors are
    5.7e-3 on pos_embed and 4.7e-4 on outputs of size ~3; with white-noise embeddings
    (|pos| <= 0.093) they grow to 3.5e-2 and 2.6e-3."""
    trunk, _ = _split(tiny)
    gen = torch.Generator().manual_seed(4)
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    freq, phase = 0.6 * torch.rand(48, generator=gen), 2 * math.pi * torch.rand(48, generator=gen)
    trunk["pos_embed"] = 0.1 * torch.sin(freq * (xx.reshape(-1, 1) + 0.7 * yy.reshape(-1, 1)) + phase)[None]
    torch.save(_vissl(trunk), tmp_path / "a.torch")
    r_up = _convert(tmp_path / "a.torch", tmp_path / "up.torch", target_format="vissl", image_size=64)
    r_down = _convert(tmp_path / "up.torch", tmp_path / "down.torch", target_format="vissl", image_size=32)
    assert r_up["max_abs_diff"] <= 1e-6 and r_down["max_abs_diff"] <= 1e-6
    back, _ = _parts(_load(tmp_path / "down.torch"))
    assert back["pos_embed"].shape == trunk["pos_embed"].shape
    assert (back["pos_embed"] - trunk["pos_embed"]).abs().max() < 0.02
    x = _images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_tiny_model(back)(x), _tiny_model(trunk)(x), rtol=0, atol=5e-3)


def test_resample_non_square(tmp_path, tiny):
    trunk, _ = _split(tiny)
    torch.save(_vissl(trunk), tmp_path / "a.torch")
    report = _convert(tmp_path / "a.torch", tmp_path / "b.torch", target_format="vissl", image_size=[32, 48])
    assert report["model"]["img_size"] == (32, 48) and report["max_abs_diff"] <= 1e-6  # observed 0
    new_trunk, _ = _parts(_load(tmp_path / "b.torch"))
    assert new_trunk["pos_embed"].shape == (1, 24, 48)
    x = _images(32, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            _tiny_model(new_trunk, img_size=(32, 48))(x), _tiny_model(trunk)(x), rtol=0, atol=1e-6
        )
    # Limitation: a non-square file cannot be read again (img_size is inferred from a square grid).
    with pytest.raises(CheckpointError, match="not a square grid"):
        _convert(tmp_path / "b.torch", tmp_path / "c.pth", target_format="timm")


def test_non_square_timm_target_is_refused_clearly(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="square"):
        _convert(tmp_path / "a.pth", tmp_path / "b.pth", target_format="timm", image_size=[32, 48])


def test_patch_size_change_keeps_grid(tmp_path, tiny):
    """Patch 8 -> 4 at 16 px (same 4x4 grid): pos_embed unchanged, the kernel PI-resized.
    For 2x shrinking, a 16 px image gives the tokens that the old kernel gives for the
    image upsampled by pixel repetition, so the outputs agree (observed 6.4e-7)."""
    trunk, _ = _split(tiny)
    torch.save(_vissl(trunk), tmp_path / "a.torch")
    report = _convert(tmp_path / "a.torch", tmp_path / "b.torch", target_format="vissl", patch_size=4, image_size=16)
    assert "patch size changed" in report["verification"]
    assert (report["model"]["patch_size"], report["model"]["img_size"]) == (4, (16, 16))
    new_trunk, _ = _parts(_load(tmp_path / "b.torch"))
    assert torch.equal(new_trunk["pos_embed"], trunk["pos_embed"])
    assert new_trunk["patch_embed.proj.weight"].shape == (48, 3, 4, 4)
    x = _images(16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            _tiny_model(new_trunk, img_size=16, patch_size=4)(x),
            _tiny_model(trunk)(F.interpolate(x, scale_factor=2, mode="nearest")),
            rtol=0,
            atol=1e-5,
        )


def test_image_size_not_divisible(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl", image_size=30)
    assert _folder(tmp_path) == {"a.pth"}


# --------------------------------------------------------------------------- 6. safety
class _Payload:
    """Pickles as a call of Path.touch(marker): harmless, but visible if ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path, tiny):
    marker = tmp_path / "MARKER"
    torch.save({"model": tiny, "extra": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load") as info:
        _convert(tmp_path / "evil.pth", tmp_path / "out.torch", target_format="vissl")
    assert "weights_only" in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.torch").exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_existing_output_needs_overwrite(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    (tmp_path / "out.torch").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        _convert(tmp_path / "a.pth", tmp_path / "out.torch", target_format="vissl")
    assert (tmp_path / "out.torch").read_bytes() == b"old"
    _convert(tmp_path / "a.pth", tmp_path / "out.torch", target_format="vissl", overwrite=True)
    _assert_identical(_parts(_load(tmp_path / "out.torch"))[0], _split(tiny)[0])
    assert _folder(tmp_path) == {"a.pth", "out.torch"}


@pytest.mark.parametrize("failure", ["tolerance", "head"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_conversion_leaves_nothing(tmp_path, tiny, failure, existing):
    trunk, heads = _split(tiny)
    if failure == "head":
        heads["0.clf.2.weight"] = torch.zeros(3, CLASSES)
    torch.save(_vissl(trunk, heads), tmp_path / "a.torch")
    if existing:
        (tmp_path / "out.pth").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="verification failed" if failure == "tolerance" else "keep_head=false"):
        _convert(
            tmp_path / "a.torch",
            tmp_path / "out.pth",
            target_format="timm",
            overwrite=existing,
            verify_tolerance=-1.0 if failure == "tolerance" else 1e-4,
        )
    assert _folder(tmp_path) == ({"a.torch", "out.pth"} if existing else {"a.torch"})
    if existing:
        assert (tmp_path / "out.pth").read_bytes() == b"old"


def test_failed_save_leaves_no_partial_file(tmp_path, tiny, monkeypatch):
    torch.save(tiny, tmp_path / "a.pth")
    (tmp_path / "out.torch").write_bytes(b"old")

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:  # torch.save is given the temporary file's name
            handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        _convert(tmp_path / "a.pth", tmp_path / "out.torch", target_format="vissl", overwrite=True, verify=False)
    assert _folder(tmp_path) == {"a.pth", "out.torch"}
    assert (tmp_path / "out.torch").read_bytes() == b"old"


def test_unreadable_inputs_and_missing_folders(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    data = (tmp_path / "a.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _convert(tmp_path / "half.pth", tmp_path / "out.torch", target_format="vissl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _convert(tmp_path / "absent.pth", tmp_path / "out.torch", target_format="vissl")
    with pytest.raises(FileNotFoundError, match="output folder"):
        _convert(tmp_path / "a.pth", tmp_path / "no" / "such" / "out.torch", target_format="vissl")
    assert _folder(tmp_path) == {"a.pth", "half.pth"}


def _corrupt(tiny: dict[str, torch.Tensor], kind: str):
    """A timm state dict with one bad key, and that key's name."""
    state = dict(tiny)
    if kind == "missing":
        key = "blocks.1.mlp.fc1.bias"
        del state[key]
    elif kind == "unexpected":
        key = "blocks.1.attn.extra_scale"
        state[key] = torch.ones(4)
    else:
        key = "cls_token"
        state[key] = torch.zeros(1, 1, 40)
    return state, key


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_key_is_named_when_verified(tmp_path, tiny, kind):
    """verify=true: the key check names the key before anything is loaded."""
    state, key = _corrupt(tiny, kind)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _convert(tmp_path / "bad.pth", tmp_path / "out.torch", target_format="vissl")
    assert _folder(tmp_path) == {"bad.pth"}


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
@pytest.mark.parametrize("target", ["vissl", "timm"])
def test_bad_key_is_named_without_verification(tmp_path, tiny, kind, target):
    state, key = _corrupt(tiny, kind)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError), match=key.replace(".", r"\.")):
        _convert(tmp_path / "bad.pth", tmp_path / "out", target_format=target, verify=False)
    assert _folder(tmp_path) == {"bad.pth"}


def test_mlp_shape_mismatch_names_the_key(tmp_path, tiny):
    state = dict(tiny)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 48)
    state["blocks.1.mlp.fc1.bias"] = torch.zeros(100)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1"):
        _convert(tmp_path / "bad.pth", tmp_path / "out.torch", target_format="vissl")


@pytest.mark.parametrize("verify", [True, False])
def test_vissl_convit_missing_key_is_named(tmp_path, vissl_convit_trunk, verify):
    sd = dict(vissl_convit_trunk.state_dict())
    del sd["blocks.1.mlp.linear_2.weight"]
    torch.save(_vissl(sd), tmp_path / "bad.torch")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.linear_2\.weight"):
        _convert(tmp_path / "bad.torch", tmp_path / "out.pth", target_format="timm", verify=verify)
    sd = dict(vissl_convit_trunk.state_dict(), **{"blocks.0.attn.extra": torch.ones(2)})
    torch.save(_vissl(sd), tmp_path / "bad.torch")
    with pytest.raises(ValueError, match=r"unexpected key.*blocks\.0\.attn\.extra"):
        _convert(tmp_path / "bad.torch", tmp_path / "out.pth", target_format="timm", verify=verify)
    assert _folder(tmp_path) == {"bad.torch"}


def test_format_and_arch_errors(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    out = tmp_path / "out.torch"
    with pytest.raises(ValueError, match="source_format 'foo' is not one of auto, vissl, timm, vissl_convit"):
        _convert(tmp_path / "a.pth", out, target_format="vissl", source_format="foo")
    with pytest.raises(ValueError, match="target_format 'bar' is not one of vissl, timm, vissl_convit"):
        _convert(tmp_path / "a.pth", out, target_format="bar")
    with pytest.raises(CheckpointError, match="declared vissl_convit but holds a timm checkpoint"):
        _convert(tmp_path / "a.pth", out, target_format="vissl", source_format="vissl_convit")
    with pytest.raises(CheckpointError, match="is not a convit_base: width 48"):
        _convert(tmp_path / "a.pth", out, target_format="vissl", arch="convit_base")
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        _convert(tmp_path / "a.pth", out, target_format="vissl", dtype="float64")
    assert _folder(tmp_path) == {"a.pth"}


def test_config_errors():
    with pytest.raises(FileNotFoundError, match="available: .*timm_to_vissl.*vissl_to_timm"):
        load_config(["config=no_such_config"])
    with pytest.raises(ValueError, match="bogus.*fields: input, output, source_format"):
        load_config(["config=timm_to_vissl", "bogus=1"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(["config=timm_to_vissl", "input"])
    cfg = load_config(["config=vissl_resize", "input=a", "output=b", "image_size=[32,48]"])
    assert (cfg.source_format, cfg.target_format, cfg.keep_head, list(cfg.image_size)) == (
        "vissl",
        "vissl",
        False,
        [32, 48],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_dtype_is_preserved(tmp_path, tiny, dtype):
    half = {k: v.to(dtype) for k, v in tiny.items()}
    torch.save(half, tmp_path / "a.pth")
    r1 = _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl")
    r2 = _convert(tmp_path / "b.torch", tmp_path / "c.pth", target_format="timm")
    assert r1["max_abs_diff"] < 1e-5 and r2["max_abs_diff"] < 1e-5  # observed 3.0e-8 (fp16), 1.2e-7 (bf16)
    trunk, heads = _parts(_load(tmp_path / "b.torch"))
    assert {v.dtype for v in [*trunk.values(), *heads.values()]} == {dtype}
    _assert_identical(_load(tmp_path / "c.pth"), half)
    r3 = _convert(tmp_path / "a.pth", tmp_path / "f32.pth", target_format="timm", dtype="float32")
    assert any("float32" in n for n in r3["notes"])
    _assert_identical(_load(tmp_path / "f32.pth"), {k: v.float() for k, v in half.items()})


def test_downcast_with_default_verification(tmp_path, tiny):
    torch.save(tiny, tmp_path / "a.pth")
    _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl", dtype="bfloat16")
    trunk, _ = _parts(_load(tmp_path / "b.torch"))
    assert trunk["pos_embed"].dtype == torch.bfloat16


def test_vissl_convit_target_explains_eps(tmp_path, tiny):
    """VISSL's trunk fixes LayerNorm eps at 1e-5: the conversion says so and verifies
    the target against convit_ssl at that eps."""
    torch.save(tiny, tmp_path / "a.pth")
    report = _convert(tmp_path / "a.pth", tmp_path / "b.torch", target_format="vissl_convit")
    assert report["max_abs_diff"] < 1e-5
    assert any("LayerNorm eps 1e-05" in note for note in report["notes"])


# --------------------------------------------------------------------------- 7. command line
def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_tool_script(tmp_path, tiny):
    work = tmp_path / "work"
    work.mkdir()
    torch.save(tiny, work / "in.pth")
    proc = _run([str(TOOL), "config=timm_to_vissl", "input=in.pth", "output=out.torch"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted in.pth (timm) -> out.torch (vissl)" in proc.stdout
    assert "verification: strict load into the target" in proc.stdout and "head: 5 classes" in proc.stdout
    _assert_identical(_parts(_load(work / "out.torch"))[0], _split(tiny)[0])
    proc = _run([str(TOOL), "config=timm_to_vissl", "input=in.pth", "output=out.torch"], work)  # exists
    assert proc.returncode == 2 and "convit-ssl convert: error: 'out.torch' exists" in proc.stderr
    assert "overwrite=true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_cli_module(tmp_path, tiny):
    torch.save(tiny, tmp_path / "in.pth")
    proc = _run(
        [
            "-m",
            "convit_ssl.cli",
            "convert",
            "config=timm_to_vissl",
            "input=in.pth",
            "output=out.torch",
            "keep_head=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head: none" in proc.stdout
    assert _parts(_load(tmp_path / "out.torch"))[1] == {}
    proc = _run(["-m", "convit_ssl.cli", "convert", "config=nope", "input=in.pth", "output=x.torch"], tmp_path)
    assert proc.returncode == 2 and "convit-ssl convert: error:" in proc.stderr and "available:" in proc.stderr


def test_cli_reports_bad_keys_as_errors(tmp_path, tiny, capsys):
    from convit_ssl.cli import main

    state, _ = _corrupt(tiny, "missing")
    torch.save(state, tmp_path / "bad.pth")
    rc = main(["convert", "config=timm_to_vissl", f"input={tmp_path / 'bad.pth'}", f"output={tmp_path / 'out.torch'}"])
    assert rc == 2 and "blocks.1.mlp.fc1.bias" in capsys.readouterr().err
