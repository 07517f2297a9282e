"""convit_ssl.checkpoints.resample: pos_embed resampling and FlexiViT PI-resize of patch kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import convit_ssl
from convit_ssl.checkpoints.resample import (
    resample_state_dict,
    resize_matrix,
    resize_patch_embed,
    resize_patch_embed_state_dict,
)
from convit_ssl.models.geometry import patch_grid


def _smooth_pos_embed(grid, dim=32, cycles=1.0, seed=0):
    """(1, H*W, dim): per channel a plane wave of at most `cycles` periods across the grid."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    freq = (torch.rand(dim, 2, generator=g) * 2 - 1) * 2 * math.pi * cycles
    phase = torch.rand(dim, generator=g) * 2 * math.pi
    waves = torch.sin(freq[:, 0, None, None] * xs / w + freq[:, 1, None, None] * ys / h + phase[:, None, None])
    return waves.permute(1, 2, 0).reshape(1, h * w, dim)


def _tiny(img_size, patch_size, seed=0):
    torch.manual_seed(seed)
    return convit_ssl.create_model(
        "convit_tiny", img_size=img_size, patch_size=patch_size, depth=2, num_gpsa_layers=1, num_classes=0
    ).eval()


# ------------------------------------------------------------------ patch_grid
def test_patch_grid():
    assert patch_grid(224, 16) == (14, 14)
    assert patch_grid((48, 72), 8) == (6, 9)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        patch_grid(100, 16)
    with pytest.raises(ValueError, match="patch_size"):
        patch_grid(64, 0)


# ----------------------------------------------------------------- pos_embed
def test_up_then_down_stays_close():
    pe = _smooth_pos_embed((14, 14))
    head = torch.randn(4, 4)
    sd = {"pos_embed": pe, "head.weight": head}
    up = resample_state_dict(sd, (24, 24))
    assert up["pos_embed"].shape == (1, 24 * 24, 32)
    assert up["head.weight"] is head and sd["pos_embed"] is pe  # others untouched, input not modified
    back = resample_state_dict(up, (14, 14), old_grid=(24, 24))["pos_embed"]
    # Observed (torch 2.x, CPU): max 0.0375, mean ~0.004 on unit-amplitude waves of
    # <= 1 period per grid; the loss is the antialiased (blurring) bicubic shrink.
    err = (back - pe).abs()
    assert err.max() < 0.05
    assert err.mean() < 0.01


@pytest.mark.parametrize("old, new", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (6, 9))])
def test_constant_stays_constant(old, new):
    pe = torch.full((1, old[0] * old[1], 8), 0.75)
    out = resample_state_dict({"pos_embed": pe}, new, old)["pos_embed"]
    assert out.shape == (1, new[0] * new[1], 8)
    torch.testing.assert_close(out, torch.full_like(out, 0.75), atol=1e-6, rtol=0)


def test_non_square_target_grid():
    pe = _smooth_pos_embed((7, 7), dim=6)
    out = resample_state_dict({"pos_embed": pe}, (6, 9))["pos_embed"]
    assert out.shape == (1, 54, 6)
    # Non-square source with an explicit grid, and back.
    back = resample_state_dict({"pos_embed": out}, (7, 7), old_grid=(6, 9))["pos_embed"]
    assert back.shape == pe.shape


@pytest.mark.parametrize("old, new", [(14, 24), (24, 14), (7, 5)])
def test_matches_timm(old, new):
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, old * old, 16, generator=torch.Generator().manual_seed(1))
    ours = resample_state_dict({"pos_embed": pe}, (new, new))["pos_embed"]
    theirs = resample_abs_pos_embed(pe, [new, new], num_prefix_tokens=0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_dtype_preserved_bf16_and_prefix():
    pe = _smooth_pos_embed((7, 7), dim=8).to(torch.bfloat16)
    out = resample_state_dict({"trunk.base_model.pos_embed": pe}, (5, 5), prefix="trunk.base_model.")
    assert out["trunk.base_model.pos_embed"].dtype == torch.bfloat16
    assert out["trunk.base_model.pos_embed"].shape == (1, 25, 8)


def test_resampled_state_dict_loads_and_matches_on_the_fly_resampling():
    old_img, new_img, patch = 32, 48, 8
    model_a = _tiny(old_img, patch)
    sd = resample_state_dict(model_a.state_dict(), patch_grid(new_img, patch), patch_grid(old_img, patch))
    model_b = _tiny(new_img, patch, seed=1)
    model_b.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, new_img, new_img)
    with torch.no_grad():
        torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------- bad inputs
def test_non_square_token_count_needs_old_grid():
    sd = {"pos_embed": torch.zeros(1, 54, 4)}
    with pytest.raises(ValueError, match="54 positions, not a square grid"):
        resample_state_dict(sd, (7, 7))
    assert resample_state_dict(sd, (7, 7), old_grid=(6, 9))["pos_embed"].shape == (1, 49, 4)


@pytest.mark.parametrize("shape", [(49, 4), (1, 1, 49, 4), (2, 49, 4)])
def test_pos_embed_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"must have shape \(1, N, C\)"):
        resample_state_dict({"pos_embed": torch.zeros(shape)}, (5, 5), old_grid=(7, 7))


def test_wrong_old_grid_and_missing_keys():
    with pytest.raises(ValueError, match="49 tokens"):
        resample_state_dict({"pos_embed": torch.zeros(1, 49, 4)}, (5, 5), old_grid=(6, 9))
    with pytest.raises(KeyError, match="module.pos_embed"):
        resample_state_dict({"pos_embed": torch.zeros(1, 49, 4)}, (5, 5), prefix="module.")
    with pytest.raises(KeyError, match="patch_embed.proj.weight"):
        resize_patch_embed_state_dict({"pos_embed": torch.zeros(1, 49, 4)}, 8)
    with pytest.raises(ValueError, match="kernel of shape"):
        resize_patch_embed(torch.zeros(4, 8, 8), 16)


# ------------------------------------------------------------- PI-resize
def _patch_resize(x, size):
    """The operator B applied to patches x (N, in, p, p): bilinear, no antialias."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def _tokens(x, w):
    """<x, w> for patches x (N, in, p, p) and kernels w (C, in, p, p) -> (N, C)."""
    return torch.einsum("nchw,kchw->nk", x, w)


def test_resize_matrix_is_the_interpolation():
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    mat = resize_matrix((8, 8), (12, 12))
    torch.testing.assert_close((x.reshape(5, 64) @ mat.T).reshape(5, 1, 12, 12), _patch_resize(x, 12))


def test_pi_resize_upsampling_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 8, 8, generator=g)
    w_new = resize_patch_embed(w, 16)
    assert w_new.shape == (4, 3, 16, 16) and w_new.dtype == torch.float32
    x = torch.randn(10, 3, 8, 8, generator=g)
    # <x, w> == <B x, w'> for arbitrary patches (max abs error observed 1.1e-5, float32 tokens of size ~10).
    torch.testing.assert_close(_tokens(_patch_resize(x, 16), w_new), _tokens(x, w), atol=1e-4, rtol=0)
    # Non-integer factor too (B: 8 -> 12 has full column rank).
    w12 = resize_patch_embed(w, (12, 12))
    torch.testing.assert_close(_tokens(_patch_resize(x, 12), w12), _tokens(x, w), atol=1e-4, rtol=0)
    assert resize_patch_embed(w, 8) is w


def test_pi_resize_downsampling_least_squares():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    w_new = resize_patch_embed(w, 8)
    mat = resize_matrix((16, 16), (8, 8))  # B: (64, 256)
    w_flat, w_new_flat = w.reshape(12, 256), w_new.reshape(12, 64)

    # 1) w' minimises ||B^T w' - w||: the residual is orthogonal to range(B^T) (normal equations),
    residual = w_new_flat @ mat - w_flat
    torch.testing.assert_close(residual @ mat.T, torch.zeros(12, 64, dtype=torch.float64), atol=1e-10, rtol=0)
    #    so no perturbation does better.
    best = (w_new_flat @ mat - w_flat).norm()
    for _ in range(5):
        other = w_new_flat + 1e-3 * torch.randn(12, 64, generator=g, dtype=torch.float64)
        assert (other @ mat - w_flat).norm() > best

    # 2) A downsampled patch z = B x gets the token that w gives the minimum-norm large
    #    patch pinv(B) z; for bilinear 2x shrinking (= 2x2 average pooling) that is z
    #    repeated 2x2 (nearest upsampling). Hence <x, w> == <B x, w'> for x in range(B^T),
    #    i.e. for 2x2-block-constant patches.
    z = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_patch_resize(F.interpolate(z, scale_factor=2, mode="nearest"), 8), z)
    torch.testing.assert_close(
        _tokens(z, w_new), _tokens(F.interpolate(z, scale_factor=2, mode="nearest"), w), atol=1e-10, rtol=0
    )
    # ... but not for arbitrary patches: there only the projection onto range(B^T) is kept.
    x = torch.randn(10, 3, 16, 16, generator=g, dtype=torch.float64)
    assert not torch.allclose(_tokens(_patch_resize(x, 8), w_new), _tokens(x, w), atol=1e-3)
    projected = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")  # P x
    torch.testing.assert_close(_tokens(_patch_resize(x, 8), w_new), _tokens(projected, w), atol=1e-10, rtol=0)


def test_pi_resize_matches_timm_with_its_operator():
    from timm.layers import resample_patch_embed

    w = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for new in (8, 24):
        ours = resize_patch_embed(w, new, interpolation="bicubic", antialias=True)
        theirs = resample_patch_embed(w, [new, new])  # timm: bicubic, antialias, float32
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_pi_resize_dtype_preserved():
    w = torch.randn(4, 3, 8, 8).to(torch.bfloat16)
    assert resize_patch_embed(w, 16).dtype == torch.bfloat16


def test_model_patch16_to_patch8_same_grid():
    """Patch 16 at 64 px -> patch 8 at 32 px: same 4x4 grid, pos_embed unchanged.

    Shrinking patches, PI-resize is exact on range(B^T): the small model on an image
    equals the large model on that image upsampled by pixel repetition (nearest, 2x).
    It is not exact for the bilinearly upsampled image (bilinear 2x upsampling followed
    by 2x2 averaging is not the identity, and mixes pixels across patch borders).
    """
    big = _tiny(64, 16)
    original = big.state_dict()
    sd = resize_patch_embed_state_dict(original, 8)
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 8, 8)
    assert all(sd[k] is original[k] for k in original if k != "patch_embed.proj.weight")  # bias, pos_embed, ...
    small = _tiny(32, 8, seed=1)
    small.load_state_dict(sd, strict=True)

    x_small = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb_small, grid_small = small.patch_embed(x_small)
        emb_big, grid_big = big.patch_embed(F.interpolate(x_small, scale_factor=2, mode="nearest"))
        assert grid_small == grid_big == (4, 4)
        torch.testing.assert_close(emb_small, emb_big, atol=1e-5, rtol=0)
        # Whole model too, since pos_embed, grid and all other weights are shared.
        torch.testing.assert_close(
            small(x_small), big(F.interpolate(x_small, scale_factor=2, mode="nearest")), atol=1e-5, rtol=0
        )
        emb_bilinear, _ = big.patch_embed(F.interpolate(x_small, scale_factor=2, mode="bilinear"))
        assert not torch.allclose(emb_small, emb_bilinear, atol=1e-3)


def test_model_patch8_to_patch16_upsampled_patches():
    """Growing patches, PI-resize is exact for any image whose patches are each
    resized by B (patch-wise bilinear 8 -> 16, no antialias)."""
    small = _tiny(32, 8)
    big = _tiny(64, 16, seed=1)
    big.load_state_dict(resize_patch_embed_state_dict(small.state_dict(), 16), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    # (B, 3, 4*8, 4*8) -> patches (B*16, 3, 8, 8) -> resize each -> (B, 3, 4*16, 4*16)
    patches = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(32, 3, 8, 8)
    up = _patch_resize(patches, 16).reshape(2, 4, 4, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(big.patch_embed(up)[0], small.patch_embed(x)[0], atol=1e-4, rtol=0)
