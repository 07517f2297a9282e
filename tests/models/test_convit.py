"""Tests of the pure-PyTorch ConViT models (convit_ssl.models).

Covers numerical parity with timm's reference ConViT (outputs and gradients,
eval and train), the convolutional initialisation, the convolution
equivalence of GPSA (Cordonnier et al., 2020), gradients reaching every
parameter, non-square and resized inputs, the relative geometry, the fused
vs explicit GPSA paths, named features, input validation and the parameter
counts of the named architectures. CPU only, small models.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.convit import GPSA as TimmGPSA

from convit_ssl.models import GPSA, MHSA, create_model, list_models, model_kwargs, resample_pos_embed
from convit_ssl.models.attention import _merge_heads, _split_heads
from convit_ssl.models.geometry import relative_offsets
from helpers import block_outputs, perturb_

# fp32: outputs within 1e-5 absolute; gradients within 1e-5 of each parameter's
# gradient scale, max(1, max |grad|) (summed over batch and tokens, gradients
# reach ~50, where fp32 summation-order noise alone is ~3e-5 absolute; timm's
# own fp32 gradients differ from its fp64 ones by as much). fp64: both within
# 1e-10 absolute, so any systematic difference would show.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def _timm_and_ours(timm_arch: str, our_arch: str, seed: int, timm_kwargs: dict, our_kwargs: dict):
    """timm's model with perturbed weights, and ours with the same state dict (strict)."""
    torch.manual_seed(seed)
    ref = timm.create_model(timm_arch, **timm_kwargs)
    ours = create_model(our_arch, **our_kwargs)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert {k: tuple(v.shape) for k, v in ref_sd.items()} == {k: tuple(v.shape) for k, v in our_sd.items()}
    perturb_(ref, seed + 1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _grad_errors(ref_params: dict, our_params: dict) -> dict:
    """Per parameter name: max |g_ref - g_ours| / max(1, max |g_ref|)."""
    assert set(ref_params) == set(our_params)
    errors = {}
    for name, p_ref in ref_params.items():
        g_ref, g_ours = p_ref.grad, our_params[name].grad
        assert g_ref is not None and g_ours is not None, name
        scale = max(1.0, g_ref.abs().max().item())
        errors[name] = (g_ref - g_ours).abs().max().item() / scale
    return errors


def _check_parity(ref, ours, x: torch.Tensor, train: bool, dtype: torch.dtype, seed: int = 0) -> None:
    """Outputs and every parameter's gradient of loss = (out * w).sum() agree within TOL[dtype]."""
    ref.to(dtype).train(train)
    ours.to(dtype).train(train)
    x = x.to(dtype)
    torch.manual_seed(seed)
    out_ref = ref(x)
    torch.manual_seed(seed)
    out_ours = ours(x)
    assert out_ref.shape == out_ours.shape
    assert (out_ref - out_ours).abs().max().item() <= TOL[dtype]
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    (out_ref * w).sum().backward()
    (out_ours * w).sum().backward()
    errors = _grad_errors(dict(ref.named_parameters()), dict(ours.named_parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL[dtype], (worst, errors[worst])


MODES = pytest.mark.parametrize(
    "train,dtype",
    [(False, torch.float32), (True, torch.float32), (False, torch.float64)],
    ids=["eval-fp32", "train-fp32", "eval-fp64"],
)


# Small non-default config: 9 heads (3x3 kernel), 64 px, patch 16, 4 blocks of which 2 GPSA, qkv bias, 7 classes.
_SMALL_TIMM = dict(img_size=64, patch_size=16, depth=4, local_up_to_layer=2, qkv_bias=True, num_classes=7)
_SMALL_OURS = dict(img_size=64, patch_size=16, depth=4, num_gpsa_layers=2, qkv_bias=True, num_classes=7)


# ---------------------------------------------------------------- 1. timm parity
@MODES
def test_parity_with_timm_convit_tiny(train, dtype):
    ref, ours = _timm_and_ours("convit_tiny", "convit_tiny", 0, {}, {})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    _check_parity(ref, ours, x, train, dtype)


@MODES
def test_parity_with_timm_small_custom_config(train, dtype):
    ref, ours = _timm_and_ours("convit_small", "convit_small", 10, _SMALL_TIMM, _SMALL_OURS)
    assert sum(isinstance(b.attn, GPSA) for b in ours.blocks) == 2
    assert ours.blocks[0].attn.num_heads == 9 and ours.width == 9 * 48
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _check_parity(ref, ours, x, train, dtype)


@pytest.mark.parametrize("use_pos_embed", [True, False], ids=["pos_embed", "no_pos_embed"])
def test_parity_with_timm_patch8_and_locality_strength(use_pos_embed):
    """Patch 8, 9 heads, locality strength 2.5, features-only head (num_classes=0)."""
    common = dict(img_size=32, patch_size=8, depth=3, locality_strength=2.5, num_classes=0, use_pos_embed=use_pos_embed)
    ref, ours = _timm_and_ours(
        "convit_small", "convit_small", 20, dict(local_up_to_layer=2, **common), dict(num_gpsa_layers=2, **common)
    )
    assert ("pos_embed" in ours.state_dict()) == use_pos_embed
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _check_parity(ref, ours, x, train=False, dtype=torch.float32)


def test_our_checkpoint_loads_into_timm(tmp_path):
    """The reverse direction: our state dict, saved and reloaded, is a strict timm checkpoint."""
    torch.manual_seed(0)
    ours = create_model("convit_small", **_SMALL_OURS).eval()
    perturb_(ours, 1)
    path = tmp_path / "convit.pth"
    torch.save(ours.state_dict(), path)
    ref = timm.create_model("convit_small", **_SMALL_TIMM).eval()
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= TOL[torch.float32]


def test_parity_with_timm_train_mode_with_stochastic_regularisation():
    """Drop path, projection/pos/head dropout draw random numbers in timm's order,
    so a seeded training forward matches timm's exactly (attention dropout off:
    our MHSA fuses it into SDPA, which draws its mask differently)."""
    rates = dict(drop_path_rate=0.3, proj_drop_rate=0.1, pos_drop_rate=0.1, drop_rate=0.1)
    ref, ours = _timm_and_ours(
        "convit_tiny",
        "convit_tiny",
        30,
        dict(img_size=32, patch_size=8, depth=4, local_up_to_layer=2, num_classes=5, **rates),
        dict(img_size=32, patch_size=8, depth=4, num_gpsa_layers=2, num_classes=5, **rates),
    )
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _check_parity(ref, ours, x, train=True, dtype=torch.float32, seed=5)
    ours.eval()
    torch.manual_seed(5)
    train_out = ours.train()(x)
    assert (train_out - ours.eval()(x)).abs().max().item() > 1e-3  # the regularisers are active


# ---------------------------------------------------------------- 2. init
def _gpsa_layers(model):
    return [m for m in model.modules() if isinstance(m, GPSA)]


def test_convit_tiny_init_matches_timm_local_init():
    torch.manual_seed(0)
    ours = create_model("convit_tiny")
    ref = timm.create_model("convit_tiny")
    layers, ref_layers = _gpsa_layers(ours), [m for m in ref.modules() if isinstance(m, TimmGPSA)]
    assert len(layers) == len(ref_layers) == 10
    for layer, ref_layer in zip(layers, ref_layers):
        assert torch.equal(layer.v.weight, torch.eye(192))
        assert torch.equal(layer.gating_param, torch.ones(4))
        # 4 heads = 2 x 2 grid: every row of pos_proj is deterministic
        assert torch.equal(layer.pos_proj.weight, ref_layer.pos_proj.weight)
        assert torch.equal(layer.pos_proj.bias, torch.zeros(4))
    expected = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0]])
    assert torch.equal(layers[0].pos_proj.weight, expected)  # head h1 + 2 h2 -> offset (h2 - .5, h1 - .5)


@pytest.mark.parametrize("num_heads,strength", [(9, 2.5), (6, 0.5)])
def test_local_init_matches_timm_on_kernel_grid(num_heads, strength):
    """Heads on the k x k grid (k = floor(sqrt(heads))) get timm's deterministic
    init scaled by locality_strength; heads beyond k^2 keep a random init."""
    k = math.isqrt(num_heads)
    torch.manual_seed(0)
    ours = create_model(
        "convit_small",
        img_size=32,
        patch_size=8,
        depth=2,
        num_gpsa_layers=1,
        num_heads=num_heads,
        width=num_heads * 16,
        locality_strength=strength,
    )
    ref = timm.create_model(
        "convit_small",
        img_size=32,
        patch_size=8,
        depth=2,
        local_up_to_layer=1,
        num_heads=num_heads,
        embed_dim=16,
        locality_strength=strength,
    )
    (layer,) = _gpsa_layers(ours)
    (ref_layer,) = [m for m in ref.modules() if isinstance(m, TimmGPSA)]
    assert torch.equal(layer.pos_proj.weight[: k * k], ref_layer.pos_proj.weight[: k * k])
    assert torch.equal(layer.v.weight, torch.eye(num_heads * 16))
    assert torch.equal(layer.gating_param, torch.ones(num_heads))
    assert layer.pos_proj.weight[: k * k, 2].eq(-strength).all()
    if num_heads > k * k:
        assert layer.pos_proj.weight[k * k :].abs().max().item() < 0.1  # trunc-normal(0.02) rows, unscaled * strength


def test_reset_parameters_restores_local_init():
    torch.manual_seed(0)
    model = create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2)
    perturb_(model, 1)
    model.reset_parameters()
    for layer in _gpsa_layers(model):
        assert torch.equal(layer.v.weight, torch.eye(192))
        assert torch.equal(layer.gating_param, torch.ones(4))


# ---------------------------------------------------------------- 3. convolution equivalence
def _conv_gpsa(d: int, c_out: int, kernel: torch.Tensor, strength: float) -> GPSA:
    """A 9-head GPSA (width 9 d) set up to compute a 3x3 convolution; see the test."""
    torch.manual_seed(0)
    gpsa = GPSA(9 * d, num_heads=9, locality_strength=strength)
    gpsa.local_init()
    with torch.no_grad():
        gpsa.gating_param.fill_(20.0)  # sigmoid(20) == 1 in fp32: purely positional
        gpsa.qk.weight.normal_(0.0, 1.0)  # content attention is irrelevant, make it loud anyway
        gpsa.v.weight.zero_()
        gpsa.proj.weight.zero_()
        gpsa.proj.bias.zero_()
        for h1 in range(3):
            for h2 in range(3):
                head = h1 + 3 * h2  # attends to (dx, dy) = (h2 - 1, h1 - 1)
                gpsa.v.weight[head * d : (head + 1) * d, :d] = torch.eye(d)
                gpsa.proj.weight[:c_out, head * d : (head + 1) * d] = kernel[:, :, h1, h2]
    return gpsa


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_gpsa_computes_a_3x3_convolution(explicit):
    """Cordonnier et al.: a 9-head attention layer with positional attention can express a 3x3 conv.

    Construction: tokens have dim = 9 d channels on an H x W grid; the image is
    their first d channels. After local_init with a large locality strength
    (alpha = 50) and the gate at +20, head h = h1 + 3 h2 attends (softmax weight
    1 - O(e^-alpha)) to the single key at offset (dx, dy) = (h2 - 1, h1 - 1)
    from the query (x = column). The value projection copies the d image
    channels into every head's d-channel slice (v.weight[h d:(h+1) d, :d] = I),
    so head h outputs in[y + dy, x + dx]. conv2d (cross-correlation, padding 1)
    gives out[y, x] = sum_{ky, kx} W[:, :, ky, kx] in[y + ky - 1, x + kx - 1],
    so head h pairs with the tap (ky, kx) = (dy + 1, dx + 1) = (h1, h2):
    proj.weight[:C_out, h d:(h+1) d] = W[:, :, h1, h2], the other rows zero.
    On interior patches (3x3 neighbourhood inside the grid) the output's first
    C_out channels equal the convolution; observed max error 3.8e-6 for outputs
    up to ~22 (fused and explicit paths alike; alpha = 20 gives the same, alpha = 10
    gives 4e-3, alpha = 1 gives 15), bound 1e-4. The remaining channels are exactly zero.
    """
    d, c_out, grid = 4, 5, (5, 6)
    kernel = torch.randn(c_out, d, 3, 3, generator=torch.Generator().manual_seed(1))
    gpsa = _conv_gpsa(d, c_out, kernel, strength=50.0).eval()
    x = torch.randn(2, grid[0] * grid[1], 9 * d, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if explicit:
            v = _split_heads(gpsa.v(x), 9)
            out = gpsa.proj(_merge_heads(gpsa.attention_maps(x, grid) @ v))
        else:
            out = gpsa(x, grid)
    image = x[..., :d].transpose(1, 2).reshape(2, d, *grid)
    expected = F.conv2d(image, kernel, padding=1)
    got = out[..., :c_out].transpose(1, 2).reshape(2, c_out, *grid)
    err = (got - expected)[:, :, 1:-1, 1:-1].abs().max().item()
    assert err < 1e-4
    assert torch.equal(out[..., c_out:], torch.zeros_like(out[..., c_out:]))
    assert expected[:, :, 1:-1, 1:-1].abs().max().item() > 1.0  # not trivially small


def test_gpsa_positional_attention_peaks_at_head_offsets():
    """After local_init with a large strength, head h1 + 3 h2 puts ~all its mass on the key
    at (dx, dy) = (h2 - 1, h1 - 1), and at alpha = 1 the same construction is NOT a conv."""
    grid = (5, 6)
    gpsa = GPSA(18, num_heads=9, locality_strength=50.0)
    gpsa.local_init()
    with torch.no_grad():
        attn = gpsa.positional_attention(grid)
    for y in range(1, grid[0] - 1):
        for x in range(1, grid[1] - 1):
            for h1 in range(3):
                for h2 in range(3):
                    key = (y + h1 - 1) * grid[1] + (x + h2 - 1)
                    assert attn[h1 + 3 * h2, y * grid[1] + x, key].item() > 1 - 1e-6

    kernel = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    soft = _conv_gpsa(4, 5, kernel, strength=1.0).eval()
    tokens = torch.randn(1, 30, 36, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = soft(tokens, grid)[..., :5].transpose(1, 2).reshape(1, 5, *grid)
    expected = F.conv2d(tokens[..., :4].transpose(1, 2).reshape(1, 4, *grid), kernel, padding=1)
    assert (got - expected)[:, :, 1:-1, 1:-1].abs().max().item() > 1e-2


# ---------------------------------------------------------------- 4. gradients everywhere
def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = create_model(
        "convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2, num_classes=5, drop_path_rate=0.1
    )
    perturb_(model, 1)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    # pos_proj.bias shifts all positional scores of a head equally: softmax-invariant, zero gradient.
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max().item() == 0.0]
    assert all(n.endswith("pos_proj.bias") for n in zero), zero
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        if n.endswith(("gating_param", "pos_proj.weight", "cls_token", "pos_embed")):
            assert p.grad.abs().max().item() > 0.0, n
    assert len(names) > len(zero) * 5


def test_geometry_cached_in_inference_mode_serves_training():
    """The relative-offset cache is filled outside inference mode: a grid first
    seen under torch.inference_mode() can then be trained on."""
    torch.manual_seed(0)
    model = create_model("convit_tiny", img_size=32, patch_size=8, depth=2, num_gpsa_layers=1, num_classes=3)
    x = torch.randn(1, 3, 40, 72)  # a 5x9 grid no other test uses
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert model.blocks[0].attn.pos_proj.weight.grad.abs().sum().item() > 0


# ---------------------------------------------------------------- 5./6. input sizes, resampling
def test_non_square_input():
    torch.manual_seed(0)
    model = create_model(
        "convit_tiny", img_size=(32, 48), patch_size=8, depth=3, num_gpsa_layers=2, num_classes=5
    ).eval()
    assert model.grid == (4, 6) and model.pos_embed.shape == (1, 24, 192)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        (fmap,) = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert fmap.shape == (2, 192, 4, 6)


def test_forward_at_other_size_resamples_pos_embed():
    """A model built at 32 px and run at 48x64 equals a model built at 48x64 whose
    position embedding is the bicubic (antialiased) resample of the first one's;
    at its own construction size the second one applies its embedding unchanged."""
    torch.manual_seed(0)
    kw = dict(patch_size=8, depth=3, num_gpsa_layers=2, num_classes=5)
    small = create_model("convit_tiny", img_size=32, **kw).eval()
    perturb_(small, 1)
    big = create_model("convit_tiny", img_size=(48, 64), **kw).eval()
    sd = small.state_dict()
    pe = sd["pos_embed"].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=(6, 8), mode="bicubic", align_corners=False, antialias=True)
    sd["pos_embed"] = pe.permute(0, 2, 3, 1).reshape(1, 48, 192)
    big.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out_small, out_big = small(x), big(x)
    assert out_small.shape == (2, 5)
    assert (out_small - out_big).abs().max().item() < 1e-5
    with torch.no_grad():
        (fmap,) = small.forward_intermediates(x, indices=1, intermediates_only=True)
    assert fmap.shape == (2, 192, 6, 8)


def test_resample_pos_embed_identity_at_same_grid():
    pe = torch.randn(1, 12, 8)
    assert resample_pos_embed(pe, (3, 4), (3, 4)) is pe
    same = resample_pos_embed(pe, (3, 4), (3, 4), interpolation="bilinear")
    assert torch.equal(same, pe)
    half = pe.half()
    assert resample_pos_embed(half, (3, 4), (3, 4)) is half
    out = resample_pos_embed(half, (5, 7), (3, 4))
    assert out.dtype == torch.float16 and out.shape == (1, 35, 8)


def test_resample_pos_embed_up_then_down_stays_close():
    height = width = 14
    channels = 8
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    pe = torch.stack(
        [torch.sin(0.15 * xs * (c % 3 + 1) / 3 + 0.105 * ys * (c % 2 + 1) + c) for c in range(channels)], dim=-1
    ).reshape(1, height * width, channels)
    up = resample_pos_embed(pe, (20, 24), (14, 14))
    assert up.shape == (1, 480, channels)
    down = resample_pos_embed(up, (14, 14), (20, 24))
    err = (down - pe).abs()
    assert err.max().item() < 0.05  # observed ~0.021 (borders), amplitude 1
    assert err.mean().item() < 0.01  # observed ~0.003


@pytest.mark.parametrize("new_grid", [(9, 7), (3, 2), (5, 8), (14, 14)])
def test_resample_pos_embed_matches_timm(new_grid):
    """Same semantics as timm's resample_abs_pos_embed without prefix tokens
    (bicubic, antialiased when shrinking), on a non-square source grid."""
    pe = torch.randn(1, 6 * 5, 8, generator=torch.Generator().manual_seed(0))
    ref = resample_abs_pos_embed(pe, list(new_grid), old_size=[6, 5], num_prefix_tokens=0)
    ours = resample_pos_embed(pe, new_grid, (6, 5))
    assert ours.shape == ref.shape == (1, new_grid[0] * new_grid[1], 8)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("new_grid", [(7, 9), (3, 2), (4, 5)])
def test_resample_pos_embed_keeps_constants(new_grid):
    const = torch.randn(1, 1, 6).expand(1, 20, 6).contiguous()
    out = resample_pos_embed(const, new_grid, (4, 5))
    assert out.shape == (1, new_grid[0] * new_grid[1], 6)
    assert (out - const[:, :1]).abs().max().item() < 1e-5


def test_resample_pos_embed_layout_is_row_major():
    """An embedding that is a linear ramp along x (columns) stays a ramp along x."""
    old = (3, 4)
    xs = torch.arange(4).float().repeat(3)  # row-major: n = y * W + x
    pe = xs.view(1, 12, 1)
    out = resample_pos_embed(pe, (3, 8), old, interpolation="bilinear").view(3, 8)
    assert torch.allclose(out[0], out[2])  # nothing changes along y
    assert (out[:, 1:] - out[:, :-1]).min().item() >= 0.0  # increasing along x


# ---------------------------------------------------------------- 7. geometry
def test_relative_offsets_non_square_by_hand():
    rel = relative_offsets((2, 3), torch.device("cpu"), torch.float32)
    assert rel.shape == (6, 6, 3) and rel.dtype == torch.float32
    coords = [(x, y) for y in range(2) for x in range(3)]  # row-major, (x, y)
    expected = torch.tensor(
        [[[xj - xi, yj - yi, (xj - xi) ** 2 + (yj - yi) ** 2] for (xj, yj) in coords] for (xi, yi) in coords],
        dtype=torch.float32,
    )
    assert torch.equal(rel, expected)
    assert rel[0, 5].tolist() == [2.0, 1.0, 5.0]  # key (x=2, y=1) seen from query (0, 0)
    assert rel[4, 0].tolist() == [-1.0, -1.0, 2.0]


@pytest.mark.parametrize("side", [3, 4, 7])
def test_relative_offsets_square_matches_timm(side):
    gpsa = TimmGPSA(8, num_heads=2)
    ref = gpsa.get_rel_indices(side * side)[0]
    ours = relative_offsets((side, side), torch.device("cpu"), torch.float32)
    assert torch.equal(ours, ref)
    assert relative_offsets((side, side), torch.device("cpu"), torch.float64).dtype == torch.float64


# ---------------------------------------------------------------- 8. fused vs explicit GPSA
def _random_gpsa(seed: int, **kwargs) -> GPSA:
    torch.manual_seed(seed)
    gpsa = GPSA(24, num_heads=4, qkv_bias=True, **kwargs)
    gpsa.local_init()
    with torch.no_grad():
        for p in gpsa.parameters():
            p.add_(0.3 * torch.randn_like(p))
        gpsa.gating_param.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    return gpsa


def _explicit(gpsa: GPSA, x: torch.Tensor, grid, drop_p: float = 0.0) -> torch.Tensor:
    v = _split_heads(gpsa.v(x), gpsa.num_heads)
    attn = F.dropout(gpsa.attention_maps(x, grid), drop_p, training=drop_p > 0)
    return gpsa.proj(_merge_heads(attn @ v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gpsa_fused_path_equals_explicit_attention(dtype):
    """Eval-mode GPSA (SDPA for the content term + positional attention times V)
    equals the explicit (1 - g) softmax(QK^T) + g softmax(P), renormalised, times V:
    outputs, input gradients and parameter gradients (scale-relative, see TOL)."""
    gpsa = _random_gpsa(0).to(dtype).eval()
    grid = (5, 7)
    x = torch.randn(3, 35, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        maps = gpsa.attention_maps(x, grid)
        fused, explicit = gpsa(x, grid), _explicit(gpsa, x, grid)
    assert maps.shape == (3, 4, 35, 35)
    assert torch.allclose(maps.sum(-1), torch.ones(3, 4, 35, dtype=dtype), atol=1e-6)
    assert (fused - explicit).abs().max().item() <= TOL[dtype]
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    w = torch.randn(fused.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (gpsa(x1, grid) * w).sum().backward()
    fused_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in gpsa.named_parameters()}
    for n, p in gpsa.named_parameters():
        fused_params[n].grad = p.grad.clone()
    gpsa.zero_grad(set_to_none=True)
    (_explicit(gpsa, x2, grid) * w).sum().backward()
    x_err = (x1.grad - x2.grad).abs().max().item() / max(1.0, x2.grad.abs().max().item())
    assert x_err <= TOL[dtype]
    errors = _grad_errors(dict(gpsa.named_parameters()), fused_params)
    assert max(errors.values()) <= TOL[dtype], errors


def test_gpsa_attention_dropout_uses_explicit_path():
    grid = (3, 5)
    gpsa = _random_gpsa(0, attn_drop=0.3)
    plain = _random_gpsa(0)
    x = torch.randn(2, 15, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gpsa.train()
        torch.manual_seed(3)
        dropped = gpsa(x, grid)
        torch.manual_seed(3)
        expected = _explicit(gpsa, x, grid, drop_p=0.3)
        assert torch.allclose(dropped, expected, atol=1e-6, rtol=0)
        gpsa.eval()
        assert (dropped - gpsa(x, grid)).abs().max().item() > 1e-3  # dropout was active
        assert (gpsa(x, grid) - plain.eval()(x, grid)).abs().max().item() <= 1e-6
        assert (gpsa(x, grid) - _explicit(gpsa, x, grid)).abs().max().item() <= 1e-5


def test_gpsa_rejects_token_count_not_matching_grid():
    gpsa = GPSA(8, num_heads=2)
    with pytest.raises(ValueError, match="GPSA got 12 tokens for a 3x5 grid"):
        gpsa(torch.randn(1, 12, 8), (3, 5))


def test_mhsa_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    mhsa = MHSA(24, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 24)
    with torch.no_grad():
        q, k, v = mhsa._qkv(x)
        maps = mhsa.attention_maps(x)
        expected = mhsa.proj(_merge_heads(maps @ v))
        assert (mhsa(x) - expected).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- 9. timm's interface
def test_forward_features_and_head(feature_model):
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = feature_model.forward_features(x)
        raw = block_outputs(feature_model, x)
        assert tokens.shape == (2, 25, 192)
        torch.testing.assert_close(tokens, feature_model.norm(raw[2]), atol=1e-6, rtol=0)
        torch.testing.assert_close(feature_model.forward_head(tokens), feature_model(x), atol=1e-6, rtol=0)
        assert feature_model.forward_head(tokens, pre_logits=True).shape == (2, 192)


def test_forward_intermediates_as_timm_defines_them(feature_model):
    """Each block's output (forward hooks), patch tokens only, NCHW by default;
    the class token as prefix after it joins; timm's `indices` rules."""
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = block_outputs(feature_model, x)
        final, maps = feature_model.forward_intermediates(x)
        assert len(maps) == 3 and all(m.shape == (2, 192, 4, 6) for m in maps)
        torch.testing.assert_close(final, feature_model.forward_features(x), atol=1e-6, rtol=0)
        # GPSA blocks 0, 1: every token is a patch; MHSA block 2: class token first
        patches = [raw[0], raw[1], raw[2][:, 1:]]
        for m, p in zip(maps, patches, strict=True):
            torch.testing.assert_close(m, p.transpose(1, 2).reshape(2, 192, 4, 6), atol=1e-6, rtol=0)
        nlc = feature_model.forward_intermediates(
            x, indices=[-1, 0], norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        (p0, c0), (p2, c2) = nlc
        torch.testing.assert_close(p0, feature_model.norm(raw[0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(p2, feature_model.norm(raw[2])[:, 1:], atol=1e-6, rtol=0)
        assert c0.shape == (2, 0, 192) and torch.equal(c2, feature_model.norm(raw[2])[:, :1])
        last_two = feature_model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[0], maps[1]) and torch.testing.assert_close(last_two[1], maps[2])
        early, (only,) = feature_model.forward_intermediates(x, indices=[0], stop_early=True, norm=True)
        torch.testing.assert_close(early, feature_model.norm(raw[0]), atol=1e-6, rtol=0)
    for bad in (4, 0, [3], [-4], []):
        with pytest.raises(ValueError, match="indices="):
            feature_model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        feature_model.forward_intermediates(x, output_fmt="NHWC")


# ---------------------------------------------------------------- 10. bad input
def test_bad_width_for_heads():
    with pytest.raises(ValueError, match="width 50 is not divisible by num_heads 4"):
        create_model("convit_tiny", width=50)


def test_bad_image_size_for_patch():
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by the patch size 8"):
        create_model("convit_tiny", img_size=30, patch_size=8)


def test_bad_input_image_size_at_forward():
    model = create_model("convit_tiny", img_size=32, patch_size=8, depth=2, num_gpsa_layers=1)
    with pytest.raises(ValueError, match="image size 33x32 is not divisible by the patch size 8"):
        model(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(3, 32, 32))


def test_unknown_architecture():
    with pytest.raises(KeyError, match=r"unknown architecture 'convit_huge'; available: .*convit_tiny"):
        create_model("convit_huge")
    assert "convit_tiny" in list_models() and "deit_small" in list_models()


def test_bad_overrides():
    with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['emb_dim'\]"):
        create_model("convit_tiny", emb_dim=48)
    with pytest.raises(ValueError, match="'embed_dim' is ambiguous"):
        create_model("convit_tiny", embed_dim=48)
    with pytest.raises(ValueError, match="width 192 contradicts head_dim 32 x num_heads 4"):
        create_model("convit_tiny", head_dim=32, width=192)
    assert model_kwargs("convit_tiny", head_dim=48, width=192)["width"] == 192
    assert model_kwargs("convit_tiny", head_dim=32)["width"] == 128
    assert model_kwargs("convit_small", head_dim=64, num_heads=4)["width"] == 256


@pytest.mark.parametrize("gpsa_layers", [3, 4, -1])
def test_bad_num_gpsa_layers(gpsa_layers):
    with pytest.raises(ValueError, match=r"num_gpsa_layers must be in 0\.\.2"):
        create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=gpsa_layers)


def test_bad_pos_embed_for_resample():
    with pytest.raises(ValueError, match="stated grid 3x3 has 9"):
        resample_pos_embed(torch.randn(1, 10, 4), (4, 4), (3, 3))
    with pytest.raises(ValueError, match="expected a position embedding of shape"):
        resample_pos_embed(torch.randn(10, 4), (4, 4), (3, 3))


# ---------------------------------------------------------------- 11. DeiT baselines, sizes
def test_deit_small_is_plain_vit():
    with torch.device("meta"):
        model = create_model("deit_small")
    assert model.width == 384 and model.num_heads == 6 and model.num_gpsa_layers == 0
    assert not _gpsa_layers(model)
    assert all(isinstance(b.attn, MHSA) and b.attn.num_heads == 6 for b in model.blocks)


def test_small_deit_runs_and_has_class_token_first():
    torch.manual_seed(0)
    model = create_model("deit_small", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        ((_, prefix),) = model.forward_intermediates(
            x, indices=[0], norm=True, return_prefix_tokens=True, intermediates_only=True
        )
    assert tokens.shape == (2, 17, 384)
    assert torch.allclose(prefix[:, 0], model.norm(block_outputs(model, x)[0])[:, 0], atol=1e-5)


@pytest.mark.parametrize(
    "arch,paper_millions",
    [
        ("convit_tiny", 6),
        ("convit_tiny_plus", 10),
        ("convit_small", 27),
        ("convit_small_plus", 48),
        ("convit_base", 86),
        ("convit_base_plus", 152),
        ("deit_small", 22),
        ("deit_base", 86),
    ],
)
def test_parameter_counts_match_paper(arch, paper_millions):
    with torch.device("meta"):
        model = create_model(arch)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - paper_millions) <= 0.05 * paper_millions, count


def test_meta_init_matches_real_structure():
    with torch.device("meta"):
        meta = create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2)
    real = create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
