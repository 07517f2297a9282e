"""Tests of the analysis library (convit_ssl.analysis): gates, positional
centres and spans, nonlocality, query attention maps and `analyze`.

The exact checks use a freshly local-initialised model with 9 heads (so the
full 3x3 kernel of offsets exists) and a large locality strength, where every
number is known by hand from the local-init rule: head h = h1 + 3 * h2 has the
offset (dx, dy) = (h2 - 1, h1 - 1). Images are 28x40 with 4-pixel patches
(a non-square 7x10 grid) on a model built for 32x32 (8x8), so the analyses
also run at another input size than construction. CPU, tiny models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from convit_ssl.analysis import (
    LayerAttention,
    analyze,
    attention_maps,
    centre_query,
    collect_attention,
    gates,
    locality_strengths,
    mean_attention_distance,
    nonlocality,
    positional_centres,
    positional_spans,
)
from convit_ssl.models import create_model
from convit_ssl.models.attention import _merge_heads, _split_heads

ALPHA = 50.0
GRID = (7, 10)
IMAGE = (28, 40)
GPSA_LAYERS = 3
DEPTH = 4
HEADS = 9


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(
        img_size=32,
        patch_size=4,
        width=4 * HEADS,
        num_heads=HEADS,
        depth=DEPTH,
        num_gpsa_layers=GPSA_LAYERS,
        num_classes=0,
        locality_strength=ALPHA,
    )
    kwargs.update(overrides)
    return create_model("convit_tiny", **kwargs)


def _images(seed: int, batch: int = 2, size: tuple[int, int] = IMAGE) -> torch.Tensor:
    return torch.randn((batch, 3, *size), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking weights: N(0, 0.1^2) noise everywhere, so hidden states
    drift far from the patch embeddings over the blocks."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _offset(head: int) -> tuple[int, int]:
    """(dx, dy) of `head` by local_init's rule: head h1 + 3 * h2 -> (h2 - 1, h1 - 1)."""
    h1, h2 = head % 3, head // 3
    return h2 - 1, h1 - 1


def _hand_positional_nonlocality(grid: tuple[int, int], offset: tuple[int, int], alpha: float) -> float:
    """Mean over all queries of sum_j softmax_j(s_ij) |delta_ij| with the local-init
    score s = alpha * (2 dx Dx + 2 dy Dy - (dx^2 + dy^2)), in float64 Python."""
    height, width = grid
    cells = [(x, y) for y in range(height) for x in range(width)]
    total = 0.0
    for qx, qy in cells:
        deltas = [(kx - qx, ky - qy) for kx, ky in cells]
        scores = [alpha * (2 * dx * offset[0] + 2 * dy * offset[1] - (dx * dx + dy * dy)) for dx, dy in deltas]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        norm = sum(weights)
        total += sum(w / norm * math.hypot(dx, dy) for w, (dx, dy) in zip(weights, deltas, strict=True))
    return total / len(cells)


# --------------------------------------------------------------------------- parameters
def test_gates_at_init_are_sigmoid_of_one():
    g = gates(_model())
    assert g.shape == (GPSA_LAYERS, HEADS)
    torch.testing.assert_close(g, torch.full((GPSA_LAYERS, HEADS), 1 / (1 + math.exp(-1))))


def test_positional_centres_and_spans_equal_local_init_kernel():
    model = _model()
    expected = torch.tensor([_offset(h) for h in range(HEADS)], dtype=torch.float32)
    # The 3x3 kernel, head by head: h=0 (-1,-1), h=1 (-1,0), h=2 (-1,1), h=3 (0,-1), ... h=8 (1,1).
    assert expected[1].tolist() == [-1, 0] and expected[5].tolist() == [0, 1]
    centres = positional_centres(model)
    assert centres.shape == (GPSA_LAYERS, HEADS, 2)
    for layer in range(GPSA_LAYERS):
        torch.testing.assert_close(centres[layer], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(locality_strengths(model), torch.full((GPSA_LAYERS, HEADS), ALPHA))
    torch.testing.assert_close(positional_spans(model), torch.full((GPSA_LAYERS, HEADS), ALPHA**-0.5))


def test_non_local_head_has_nan_centre_and_infinite_span():
    model = _model()
    with torch.no_grad():
        model.blocks[1].attn.pos_proj.weight[4] = torch.tensor([1.0, -2.0, 0.5])  # w_d > 0: not local
    centres, spans, alpha = positional_centres(model), positional_spans(model), locality_strengths(model)
    assert torch.isnan(centres[1, 4]).all() and math.isinf(spans[1, 4].item()) and alpha[1, 4].item() == -0.5
    assert torch.isfinite(centres[1, :4]).all() and torch.isfinite(spans[0]).all()
    report = analyze(model, _images(0, batch=1))
    json.dumps(report, allow_nan=False)
    layer = report["layers"][1]
    assert layer["positional_centre"][4] == [None, None] and layer["span"][4] is None
    assert layer["locality_strength"][4] == -0.5


def test_deit_has_no_gpsa_rows():
    model = _model(num_gpsa_layers=0)
    assert gates(model).shape == (0, HEADS) and positional_centres(model).shape == (0, HEADS, 2)
    report = analyze(model, _images(0, batch=1))
    assert report["kinds"] == ["mhsa"] * DEPTH
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------- positional nonlocality
def test_positional_nonlocality_equals_hand_computed_softmax_mean():
    """All queries, border included, against the exact float64 softmax of the
    scores; tolerance 1e-5 (float32 attention). Values on the 7x10 grid: the
    centre head 0 (up to 1e-21), the axis heads (W-1)H/N = 0.9 and
    (H-1)W/N = 0.857 (border queries whose neighbour is missing attend to
    themselves), the diagonal heads (54 sqrt(2) + 15) / 70 = 1.3053."""
    layers = collect_attention(_model(), _images(0))
    measured = nonlocality(layers, "positional")
    assert measured.shape == (DEPTH, HEADS)
    assert torch.isnan(measured[GPSA_LAYERS:]).all()  # MHSA layers have no positional term
    hand = torch.tensor([_hand_positional_nonlocality(GRID, _offset(h), ALPHA) for h in range(HEADS)])
    for layer in range(GPSA_LAYERS):
        torch.testing.assert_close(measured[layer], hand.float(), atol=1e-5, rtol=0)
    height, width = GRID
    n = height * width
    closed_form = {0: (54 * math.sqrt(2) + 15) / n, 1: (width - 1) * height / n, 3: (height - 1) * width / n, 4: 0.0}
    for head, value in closed_form.items():
        assert measured[0, head].item() == pytest.approx(value, abs=1e-5)


def test_positional_attention_of_interior_queries_hits_one_neighbour():
    """Interior queries (every offset exists): each head puts > 1 - 1e-6 of its
    weight on the patch at its offset, so its per-query distance is |offset|."""
    layer = collect_attention(_model(), _images(0), layers=[0])[0]
    height, width = GRID
    for head in range(HEADS):
        dx, dy = _offset(head)
        for y in range(1, height - 1):
            for x in range(1, width - 1):
                row = layer.positional[head, y * width + x]
                assert row[(y + dy) * width + (x + dx)].item() > 1 - 1e-6


def test_positional_map_of_centre_query_peaks_at_centre_plus_offset():
    layers = collect_attention(_model(), _images(0))
    row, col = centre_query(GRID)
    assert (row, col) == (3, 5)
    maps = attention_maps(layers)
    for layer_maps in maps[:GPSA_LAYERS]:
        positional = layer_maps["positional"]
        assert positional.shape == (HEADS, *GRID)
        for head in range(HEADS):
            dx, dy = _offset(head)
            peak = divmod(int(positional[head].argmax()), GRID[1])
            assert peak == (row + dy, col + dx)
            assert positional[head, row + dy, col + dx].item() > 1 - 1e-6


def test_large_gates_make_combined_attention_positional():
    model = _model()
    with torch.no_grad():
        for block in model.blocks[:GPSA_LAYERS]:
            block.attn.gating_param.fill_(30.0)
    layers = collect_attention(model, _images(0))
    combined, positional = nonlocality(layers)[:GPSA_LAYERS], nonlocality(layers, "positional")[:GPSA_LAYERS]
    torch.testing.assert_close(combined, positional, atol=1e-5, rtol=0)
    maps = attention_maps(layers, query=(2, 7))
    for head in range(HEADS):
        dx, dy = _offset(head)
        combined = maps[0]["combined"][:, head]  # (B, H, W)
        assert (combined[:, 2 + dy, 7 + dx] > 1 - 1e-5).all()


# --------------------------------------------------------------------------- real hidden states
def test_collected_inputs_are_norm1_of_real_hidden_states():
    """A manual forward through the blocks: what each attention layer receives
    is norm1 of the running hidden state, and the recorded attention is the
    module's own attention of that input; raw patch embeddings (what the
    official analysis fed every layer) give different matrices after block 0."""
    model = _model()
    _perturb_(model, 1)
    model.eval()
    images = _images(0)
    layers = collect_attention(model, images)
    with torch.no_grad():
        x, grid = model._embed(images)
        raw = x
        for i, block in enumerate(model.blocks):
            if i == GPSA_LAYERS:
                x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
                raw = torch.cat([model.cls_token.expand(raw.shape[0], -1, -1), raw], dim=1)
            expected_in = block.norm1(x)
            torch.testing.assert_close(layers[i].inputs, expected_in, atol=0, rtol=0)
            torch.testing.assert_close(layers[i].combined, block.attn.attention_maps(expected_in, grid))
            if i > 0:
                from_raw = block.attn.attention_maps(block.norm1(raw), grid)
                assert (from_raw - layers[i].combined).abs().max() > 1e-3  # observed 0.016..0.10; fp32 noise ~1e-7
            x = block(x, grid)


def test_combined_attention_reproduces_each_block_attention_output():
    """combined @ V, projected, equals the attention module's forward output,
    so the recorded matrices are the ones the model used."""
    model = _model()
    _perturb_(model, 2)
    model.eval()
    with torch.no_grad():
        for layer, block in zip(collect_attention(model, _images(0)), model.blocks, strict=True):
            attn, x = block.attn, layer.inputs
            if layer.kind == "gpsa":
                v = _split_heads(attn.v(x), HEADS)
            else:
                v = _split_heads(attn.qkv(x).chunk(3, dim=-1)[2], HEADS)
            out = attn.proj(_merge_heads(layer.combined @ v))
            torch.testing.assert_close(out, attn(x, layer.grid), atol=1e-5, rtol=1e-4)


def test_content_nonlocality_depends_on_images_positional_does_not():
    model = _model()
    _perturb_(model, 3)
    first, second = (collect_attention(model, _images(seed)) for seed in (10, 11))
    content = nonlocality(first, "content")[2] - nonlocality(second, "content")[2]
    assert content.abs().max() > 1e-4
    positional = nonlocality(first, "positional")[:GPSA_LAYERS], nonlocality(second, "positional")[:GPSA_LAYERS]
    torch.testing.assert_close(*positional)


# --------------------------------------------------------------------------- definitions and shapes
def test_mhsa_nonlocality_drops_class_token_and_renormalises():
    """Grid 1x3 (patches at x = 0, 1, 2) plus class token at index 0. The class
    row and column are ignored; patch rows are renormalised over patches:
    query 0 -> keys 0 and 2 equally (distance 1), query 1 -> key 0 (1),
    query 2 -> key 2 (0): mean 2/3."""
    attn = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0],  # class token query: ignored
            [0.6, 0.2, 0.0, 0.2],
            [0.6, 0.4, 0.0, 0.0],
            [0.6, 0.0, 0.0, 0.4],
        ]
    ).expand(1, 2, 4, 4)
    value = mean_attention_distance(attn, (1, 3), class_token=True)
    torch.testing.assert_close(value, torch.full((2,), 2 / 3))
    layer = LayerAttention(index=3, kind="mhsa", grid=(1, 3), inputs=torch.zeros(1, 4, 8), combined=attn)
    torch.testing.assert_close(nonlocality([layer]), torch.full((1, 2), 2 / 3))
    maps = attention_maps([layer], query=(0, 0))[0]
    torch.testing.assert_close(maps["combined"][0, 0], torch.tensor([[0.2, 0.0, 0.2]]))
    torch.testing.assert_close(maps["class_token"], torch.full((1, 2), 0.6))


@pytest.mark.parametrize("size", [IMAGE, (16, 24), (32, 32)])
def test_shapes_for_non_square_and_other_sizes(size):
    grid = (size[0] // 4, size[1] // 4)
    n = grid[0] * grid[1]
    layers = collect_attention(_model(), _images(0, batch=3, size=size))
    assert [layer.kind for layer in layers] == ["gpsa"] * GPSA_LAYERS + ["mhsa"] * (DEPTH - GPSA_LAYERS)
    for layer in layers:
        assert layer.grid == grid
        if layer.kind == "gpsa":
            assert layer.positional.shape == (HEADS, n, n) and layer.gate.shape == (HEADS,)
            assert layer.content.shape == layer.combined.shape == (3, HEADS, n, n)
            assert layer.inputs.shape == (3, n, 4 * HEADS)
        else:
            assert layer.combined.shape == (3, HEADS, n + 1, n + 1) and layer.positional is None
        torch.testing.assert_close(layer.combined.sum(-1), torch.ones(layer.combined.shape[:-1]))
    assert nonlocality(layers).shape == (DEPTH, HEADS)
    for layer_maps in attention_maps(layers, query=(0, grid[1] - 1)):
        assert layer_maps["combined"].shape == (3, HEADS, *grid)


def test_layer_subset_equals_full_collection():
    model, images = _model(), _images(0)
    full = collect_attention(model, images)
    subset = collect_attention(model, images, layers=[3, 1])
    assert [layer.index for layer in subset] == [1, 3]
    for layer in subset:
        torch.testing.assert_close(layer.combined, full[layer.index].combined)


def test_model_flags_restored_and_no_gradients():
    model = _model()
    model.train()
    model.blocks[1].eval()  # mixed flags must come back exactly
    before = [m.training for m in model.modules()]
    report = analyze(model, _images(0))
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())
    assert report["num_images"] == 2


def test_analyze_is_json_and_consistent():
    model = _model()
    _perturb_(model, 4)
    images = _images(0)
    report = analyze(model, images, query=(1, 2))
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert report["grid"] == list(GRID) and report["query"] == [1, 2]
    assert report["num_heads"] == HEADS and report["kinds"] == ["gpsa"] * GPSA_LAYERS + ["mhsa"]
    layers = collect_attention(model, images)
    maps = attention_maps(layers, query=(1, 2))
    g, centres, spans = gates(model), positional_centres(model), positional_spans(model)
    for term in ("combined", "positional", "content"):
        values = nonlocality(layers, term)
        for i, entry in enumerate(report["layers"]):
            if term in entry["nonlocality"]:
                assert entry["nonlocality"][term] == pytest.approx(values[i].tolist(), abs=1e-6)
    for i, entry in enumerate(report["layers"]):
        assert entry["index"] == i and entry["kind"] == report["kinds"][i]
        for name, tensor in maps[i].items():
            torch.testing.assert_close(torch.tensor(entry["attention_map"][name]), tensor, atol=1e-6, rtol=0)
        if entry["kind"] == "gpsa":
            assert set(entry["nonlocality"]) == {"combined", "positional", "content"}
            assert entry["gate"] == pytest.approx(g[i].tolist())
            torch.testing.assert_close(torch.tensor(entry["positional_centre"]), centres[i])
            assert entry["span"] == pytest.approx(spans[i].tolist())
        else:
            assert set(entry["nonlocality"]) == {"combined"} and "gate" not in entry
            assert set(entry["attention_map"]) == {"combined", "class_token"}


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_with_values():
    model = _model()
    layers = collect_attention(model, _images(0, batch=1))
    with pytest.raises(ValueError, match=r"query patch \(7, 0\) outside the 7x10 grid"):
        attention_maps(layers, query=(7, 0))
    with pytest.raises(ValueError, match="unknown attention term 'value'"):
        nonlocality(layers, "value")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\), got \(3, 28, 40\)"):
        collect_attention(model, torch.zeros(3, 28, 40))
    with pytest.raises(ValueError, match="expected images with 3 channels, got 1"):
        collect_attention(model, torch.zeros(1, 1, 28, 40))
    with pytest.raises(ValueError, match=r"layer indices must be in 0..3"):
        collect_attention(model, _images(0, batch=1), layers=[4])
    with pytest.raises(ValueError, match="expected a convit_ssl.models.ConViT, got Linear"):
        gates(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"got \(1, 9, 70, 70\)"):
        mean_attention_distance(layers[0].combined, (7, 10), class_token=True)
