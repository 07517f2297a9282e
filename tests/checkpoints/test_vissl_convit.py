"""Tests of convit_ssl.checkpoints.vissl_convit: VISSL's built-in `convit` trunk <-> timm keys.

The reference is VISSL 0.1.6's own trunk (vissl/models/trunks/convit.py), built
from a composed VISSL config with tiny dimensions, its weights perturbed so that
they look trained (within-block pos_proj columns differ, gates spread). CPU only.
"""

from __future__ import annotations

import pytest
import torch

from convit_ssl.checkpoints.vissl_convit import (
    VISSL_CONVIT_NORM_EPS,
    timm_to_vissl_convit,
    vissl_convit_model_kwargs,
    vissl_convit_to_timm,
)
from convit_ssl.models import ConViT, create_model
from convit_ssl.vissl.model.trunk import named_features
from helpers import LOCALITY_DIM, vissl_builtin_trunk

# (width, heads, qkv_bias, MLP_DIM): the paper's 4x MLP with 9 heads, and an
# odd MLP width (not a multiple of the width) with biases and 4 heads.
CONFIGS = [(36, 9, False, 144), (48, 4, True, 100)]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"w{c[0]}h{c[1]}bias{int(c[2])}mlp{c[3]}")
def vissl_trunk(request) -> torch.nn.Module:
    return vissl_builtin_trunk(*request.param)


def _images(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _converted_model(vissl_sd: dict[str, torch.Tensor], **overrides) -> ConViT:
    model = ConViT(**{**vissl_convit_model_kwargs(vissl_sd), **overrides}).eval()
    model.load_state_dict(vissl_convit_to_timm(vissl_sd), strict=True)
    return model


# --------------------------------------------------------------------------- facts about VISSL's trunk
def test_vissl_trunk_layout(vissl_trunk):
    """What the converter relies on: no class slot in the position embedding,
    pos_proj (H, 3 L), gate (1, H, 1, 1), LayerNorm eps 1e-5, no head, and a
    forward that returns the class-token feature as (1, B, C)."""
    sd = vissl_trunk.state_dict()
    width, heads = vissl_trunk.embed_dim, vissl_trunk.blocks[0].attn.num_heads
    assert sd["pos_embedding"].shape == (1, 16, width)  # 4 x 4 patches, no class slot
    assert sd["class_token"].shape == (1, 1, width)
    assert sd["blocks.0.attn.pos_proj.weight"].shape == (heads, 3 * LOCALITY_DIM)
    assert sd["blocks.0.attn.alpha"].shape == (1, heads, 1, 1)
    assert "blocks.2.attn.qkv.weight" in sd and not any(k.startswith("head") for k in sd)
    assert vissl_trunk.norm.eps == VISSL_CONVIT_NORM_EPS
    with torch.no_grad():
        out = vissl_trunk(_images(), None)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, width)


# --------------------------------------------------------------------------- parity
def test_converted_model_matchesvissl_builtin_trunk(vissl_trunk):
    """Converted weights in convit_ssl's ConViT (eps 1e-5) give VISSL's features.
    Observed max |difference| (fp32): 4.8e-7 for both configurations (36 wide,
    9 heads; 48 wide, 4 heads, biases, MLP 100); features are O(1)."""
    sd = vissl_trunk.state_dict()
    model = _converted_model(sd)
    x = _images()
    with torch.no_grad():
        ref = vissl_trunk(x, None)[0]
        out = model(x)
        feat = named_features(model, x, ["lastCLS"])[0]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(feat, ref, rtol=0, atol=1e-5)


def test_wrong_norm_eps_is_visible(vissl_trunk):
    """With timm's eps (1e-6) instead of VISSL's 1e-5 the features drift by
    4.6e-3 / 9.2e-3 (observed), ~10^4 x the 4.8e-7 of the right eps."""
    model = _converted_model(vissl_trunk.state_dict(), norm_eps=1e-6)
    x = _images()
    with torch.no_grad():
        err = (model(x) - vissl_trunk(x, None)[0]).abs().max().item()
    assert err > 1e-3


def test_pos_proj_needs_the_block_sums(vissl_trunk):
    """Reading one column per block (instead of the block's sum / L) changes the
    features (observed 3e-2 / 4e-2): the perturbed trunk really exercises the
    reparametrisation."""
    sd = vissl_trunk.state_dict()
    timm = vissl_convit_to_timm(sd)
    for i in range(2):
        weight = sd[f"blocks.{i}.attn.pos_proj.weight"]
        timm[f"blocks.{i}.attn.pos_proj.weight"] = weight[:, ::LOCALITY_DIM].clone()
    model = ConViT(**vissl_convit_model_kwargs(sd)).eval()
    model.load_state_dict(timm, strict=True)
    x = _images()
    with torch.no_grad():
        assert (model(x) - vissl_trunk(x, None)[0]).abs().max().item() > 1e-3


def test_timm_weights_run_invissl_builtin_trunk():
    """timm_to_vissl_convit output loads strictly into VISSL's trunk and computes
    what convit_ssl's model computes (same eps). Observed max error 4.8e-7."""
    width, heads, qkv_bias, mlp_dim = CONFIGS[1]
    trunk = vissl_builtin_trunk(width, heads, qkv_bias, mlp_dim, seed=5)
    model = ConViT(**vissl_convit_model_kwargs(trunk.state_dict())).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trunk.load_state_dict(timm_to_vissl_convit(model.state_dict(), LOCALITY_DIM), strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trunk(x, None)[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("locality_dim", [10, 3, 8])
def test_round_trip_timm_vissl_timm(locality_dim):
    """timm -> VISSL -> timm: every tensor comes back bit for bit except the
    pos_proj bias (multiplied by L and rounded once when stored in VISSL form),
    which is within one ulp (exact when L is a power of two)."""
    model = create_model(
        "convit_tiny",
        img_size=32,
        patch_size=8,
        width=48,
        depth=3,
        num_heads=4,
        num_gpsa_layers=2,
        qkv_bias=True,
        num_classes=0,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sd = model.state_dict()
    vissl = timm_to_vissl_convit(sd, locality_dim=locality_dim)
    assert vissl["blocks.0.attn.pos_proj.weight"].shape == (4, 3 * locality_dim)
    assert vissl["blocks.0.attn.alpha"].shape == (1, 4, 1, 1)
    back = vissl_convit_to_timm(vissl)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype, key
        if key.endswith("attn.pos_proj.bias") and locality_dim & (locality_dim - 1):
            torch.testing.assert_close(back[key], value, rtol=2.0**-23, atol=0)
        else:
            assert torch.equal(back[key], value), key


# --------------------------------------------------------------------------- model arguments
def test_model_kwargs(vissl_trunk):
    kwargs = vissl_convit_model_kwargs(vissl_trunk.state_dict())
    width, heads = vissl_trunk.embed_dim, vissl_trunk.blocks[0].attn.num_heads
    mlp_dim = vissl_trunk.blocks[0].mlp.linear_1.out_features
    assert {k: v for k, v in kwargs.items() if k != "mlp_ratio"} == {
        "img_size": 32,
        "patch_size": 8,
        "in_chans": 3,
        "num_classes": 0,
        "width": width,
        "depth": 3,
        "num_heads": heads,
        "num_gpsa_layers": 2,
        "qkv_bias": vissl_trunk.blocks[0].attn.qk.bias is not None,
        "norm_eps": 1e-5,
        "use_pos_embed": True,
    }
    assert int(width * kwargs["mlp_ratio"]) == mlp_dim


def test_model_kwargs_needs_a_square_grid(vissl_trunk):
    sd = dict(vissl_trunk.state_dict())
    sd["pos_embedding"] = sd["pos_embedding"][:, :15]
    with pytest.raises(ValueError, match="not a square grid"):
        vissl_convit_model_kwargs(sd)


# --------------------------------------------------------------------------- errors
def test_leftover_keys_are_listed(vissl_trunk):
    sd = dict(vissl_trunk.state_dict())
    sd["head.weight"] = torch.zeros(10, vissl_trunk.embed_dim)
    sd["blocks.0.attn.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"\['blocks\.0\.attn\.surprise', 'head\.weight'\]"):
        vissl_convit_to_timm(sd)


def test_prefixed_keys_are_refused(vissl_trunk):
    sd = {"trunk." + k: v for k, v in vissl_trunk.state_dict().items()}
    with pytest.raises(ValueError, match="'class_token'"):
        vissl_convit_to_timm(sd)


def test_missing_key_is_named(vissl_trunk):
    sd = dict(vissl_trunk.state_dict())
    del sd["blocks.1.attn.alpha"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.alpha"):
        vissl_convit_to_timm(sd)
    sd = dict(vissl_trunk.state_dict())
    del sd["blocks.2.mlp.linear_2.bias"]
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.linear_2\.bias"):
        vissl_convit_to_timm(sd)


def test_pos_proj_width_must_be_a_multiple_of_3(vissl_trunk):
    sd = dict(vissl_trunk.state_dict())
    sd["blocks.0.attn.pos_proj.weight"] = sd["blocks.0.attn.pos_proj.weight"][:, :29]
    with pytest.raises(ValueError, match="multiple of 3"):
        vissl_convit_to_timm(sd)


def test_timm_head_is_refused():
    sd = create_model(
        "convit_tiny", img_size=32, patch_size=8, width=48, depth=3, num_heads=4, num_gpsa_layers=2, num_classes=10
    ).state_dict()
    with pytest.raises(ValueError, match=r"\['head\.bias', 'head\.weight'\]"):
        timm_to_vissl_convit(sd)
    with pytest.raises(ValueError, match="locality_dim"):
        timm_to_vissl_convit(sd, locality_dim=0)


def test_input_is_not_modified(vissl_trunk):
    sd = vissl_trunk.state_dict()
    keys = list(sd)
    vissl_convit_to_timm(sd)
    assert list(sd) == keys


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_preserved(vissl_trunk, dtype):
    sd32 = vissl_trunk.state_dict()
    low = {k: v.to(dtype) for k, v in sd32.items()}
    out = vissl_convit_to_timm(low)
    assert {v.dtype for v in out.values()} == {dtype}
    ref = vissl_convit_to_timm({k: v.to(dtype).float() for k, v in sd32.items()})
    for key in ("blocks.0.attn.pos_proj.weight", "blocks.0.attn.pos_proj.bias"):
        # the fp32 conversion's values up to the low dtype's rounding (its default tolerance)
        torch.testing.assert_close(out[key], ref[key].to(dtype))
    back = timm_to_vissl_convit(out)
    assert {v.dtype for v in back.values()} == {dtype}
