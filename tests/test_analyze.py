"""Tests of the figures (convit_ssl.analysis.plots) and the analyze command
(convit_ssl.analysis.pipeline, `convit-ssl analyze`, tools/analyze.py).

A tiny ConViT (4 heads, 4 blocks of which 2 GPSA, 32x32 images, 8-pixel
patches: a 4x4 grid) is saved in each checkpoint format; the command runs on
a small folder of scikit-learn digits written by the test (nested folders, a
non-square RGB image, an upper-case extension, a hidden file and a text file
to skip). Its JSON must equal `analyze()` on the same weights and on images
prepared here independently (PIL bicubic resize, centre crop, ImageNet
normalisation in numpy). CPU, seconds.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convit_ssl import cli
from convit_ssl.analysis import analyze, plots
from convit_ssl.analysis.pipeline import IMAGENET_MEAN, IMAGENET_STD, find_images, load_model, run_analysis
from convit_ssl.analysis.plots import (
    CURVES_PIXELS,
    GATING_PIXELS,
    INITIAL_GATE,
    NONLOCALITY_PIXELS,
    attention_figsize,
    figure_pixels,
)
from convit_ssl.analysis.training_log import read_training_log
from convit_ssl.checkpoints.formats import Weights, write
from convit_ssl.checkpoints.io import save_checkpoint
from convit_ssl.models import ConViT, create_model
from helpers import REPO

TOOL = REPO / "tools" / "analyze.py"
TINY = dict(img_size=32, patch_size=8, width=32, num_heads=4, depth=4, num_gpsa_layers=2, num_classes=0)
HEADS, DEPTH, GPSA_LAYERS = 4, 4, 2
NORM_EPS = {"timm": 1e-6, "vissl": 1e-6, "vissl_convit": 1e-5}
# sorted by relative path; hidden files and non-images are skipped
IMAGE_FILES = ["0004.png", "a.png", "a/0001.PNG", "a/deep/0003.png", "b/0002.png"]  # "a.png" < "a/..."
ALL_FIGURES = ["analysis.json", "gating.png", "nonlocality.png", "attention_combined.png", "attention_positional.png"]


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """Weights of the tiny model, perturbed to look trained (gates spread, heads not all local)."""
    torch.manual_seed(0)
    model = create_model("convit_tiny", **TINY)
    gen = torch.Generator().manual_seed(1)
    out = {}
    for key, value in model.state_dict().items():
        value = value + 0.05 * torch.randn(value.shape, generator=gen)
        if key.endswith("gating_param"):
            value = value + 2.0 * torch.randn(value.shape, generator=gen)
        out[key] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, state) -> dict[str, Path]:
    """The tiny model saved in every format, with the writers of convit_ssl.checkpoints."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        fmt: save_checkpoint(write(Weights(dict(state)), fmt), folder / f"tiny_{fmt}.pth")
        for fmt in ("timm", "vissl", "vissl_convit")
    }


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Digits as images in nested folders (one RGB 8x12, one .PNG), plus files to skip."""
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:6] * (255 / 16)).round().astype(np.uint8)
    root = tmp_path_factory.mktemp("images")
    for name in ("a/deep", "b", ".hidden"):
        (root / name).mkdir(parents=True)
    Image.fromarray(digits[0]).save(root / ".hidden" / "0000.png")
    Image.fromarray(digits[1]).save(root / "a" / "0001.PNG", format="PNG")
    Image.fromarray(digits[2]).save(root / "b" / "0002.png")
    wide = np.concatenate([digits[3], digits[4][:, :4]], axis=1)  # 8 x 12
    rgb = np.stack([wide, wide[::-1], 255 - wide], axis=-1)
    Image.fromarray(rgb).save(root / "a" / "deep" / "0003.png")
    Image.fromarray(digits[5]).save(root / "0004.png")
    Image.fromarray(digits[0][::-1]).save(root / "a.png")
    (root / "notes.txt").write_text("not an image\n")
    return root


def _expected_images(root: Path, names: list[str], size: int) -> torch.Tensor:
    """The model input computed without torchvision: RGB, shorter side to `size`
    (bicubic), centre crop, /255, ImageNet mean/std."""
    batch = []
    for name in names:
        with Image.open(root / name) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
            image = image.resize((new_w, new_h), Image.BICUBIC)
            left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
            pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
        batch.append(torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy()))
    return torch.stack(batch)


def _expected_model(state: dict[str, torch.Tensor], norm_eps: float) -> ConViT:
    model = ConViT(**{**TINY, "norm_eps": norm_eps})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_same(actual: Any, expected: Any, where: str = "analysis", tol: float = 2e-5) -> None:
    """Nested JSON data equal: same keys, lengths, strings and None; numbers within `tol`."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}", tol)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]", tol)
    elif isinstance(expected, float):
        assert isinstance(actual, (int, float)) and actual == pytest.approx(expected, abs=tol), where
    else:
        assert actual == expected, where


def _strict_json(path: Path) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}: not strict JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 1000, path
    image = Image.open(path)
    assert image.format == "PNG"
    extrema = image.convert("L").getextrema()
    assert extrema[1] - extrema[0] > 100, f"{path.name} is (nearly) blank: {extrema}"
    return image


def _cli(args: list[str]) -> int:
    try:
        return cli.main(["analyze", *args])
    except SystemExit as e:  # parser.exit on user errors
        return e.code


def _record(iteration: int, gates: list[list[float]], nonloc: list[list[float]]) -> dict[str, Any]:
    """A record of the analysis hook's JSON-lines log."""
    layers = []
    for index, combined in enumerate(nonloc):
        layer: dict[str, Any] = {
            "index": index,
            "kind": "gpsa" if index < len(gates) else "mhsa",
            "nonlocality": {"combined": combined},
        }
        if index < len(gates):
            layer["gate"] = gates[index]
            layer["nonlocality"].update(positional=[1.0] * len(combined), content=[2.0] * len(combined))
        layers.append(layer)
    return {"iteration": iteration, "epoch": iteration // 10, "num_images": 4, "grid": [4, 4], "layers": layers}


def _write_log(path: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the command, every format
@pytest.mark.parametrize("fmt", ["timm", "vissl", "vissl_convit"])
def test_cli_writes_figures_and_json_equal_to_analyze(fmt, checkpoints, state, image_dir, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    assert _cli([str(checkpoints[fmt]), "--images", str(image_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_FIGURES)
    assert all(f"  {out / name}" in printed for name in ALL_FIGURES)

    assert _png(out / "gating.png").size == GATING_PIXELS == (800, 480)
    assert _png(out / "nonlocality.png").size == NONLOCALITY_PIXELS == (960, 480)
    assert _png(out / "attention_combined.png").size == figure_pixels(attention_figsize(DEPTH, HEADS, (32, 32)))
    assert _png(out / "attention_positional.png").size == figure_pixels(attention_figsize(GPSA_LAYERS, HEADS, (32, 32)))

    data = _strict_json(out / "analysis.json")
    assert data["format"] == fmt and data["images"] == IMAGE_FILES
    assert data["model"]["num_gpsa_layers"] == GPSA_LAYERS and data["model"]["norm_eps"] == NORM_EPS[fmt]
    images = _expected_images(image_dir, IMAGE_FILES, 32)
    expected = analyze(_expected_model(state, NORM_EPS[fmt]), images)
    _assert_same(data["analysis"], expected)
    # the figures' numbers are the report's
    gating = data["figures"]["gating.png"]
    _assert_same(gating["gate"], [layer["gate"] for layer in expected["layers"][:GPSA_LAYERS]])
    assert gating["gate_mean"] == pytest.approx([float(np.mean(g)) for g in gating["gate"]])
    nonloc = data["figures"]["nonlocality.png"]
    _assert_same(nonloc["combined"], [layer["nonlocality"]["combined"] for layer in expected["layers"]])
    assert nonloc["positional_mean"][GPSA_LAYERS:] == [None] * (DEPTH - GPSA_LAYERS)
    panel_max = data["figures"]["attention_combined.png"]["panel_max"]
    _assert_same(
        panel_max, [[float(np.max(m)) for m in layer["attention_map"]["combined"][0]] for layer in expected["layers"]]
    )


def test_query_image_size_and_number_of_images(checkpoints, state, image_dir, tmp_path):
    out = tmp_path / "out"
    written = run_analysis(
        checkpoints["timm"], image_dir, out, query=(0, 3), num_images=2, image_size=48, log=lambda _: None
    )
    assert [p.name for p in written] == ALL_FIGURES
    data = _strict_json(out / "analysis.json")
    assert data["images"] == IMAGE_FILES[:2] and data["image_size"] == [48, 48]
    assert data["analysis"]["grid"] == [6, 6] and data["analysis"]["query"] == [0, 3]
    expected = analyze(_expected_model(state, 1e-6), _expected_images(image_dir, IMAGE_FILES[:2], 48), (0, 3))
    _assert_same(data["analysis"], expected)
    assert _png(out / "attention_combined.png").size == figure_pixels(attention_figsize(DEPTH, HEADS, (48, 48)))


def test_official_release_with_head_loads_trunk_only(state, tmp_path):
    """The official release wraps timm's state dict as {"model": ...} and has a classifier."""
    head = {"head.weight": torch.randn(5, 32), "head.bias": torch.randn(5)}
    path = tmp_path / "official.pth"
    torch.save({"model": {**state, **head}}, path)
    model, info = load_model(path)
    assert info["format"] == "timm" and model.num_classes == 0
    assert info["notes"] == [
        "read timm weights from the 'model' entry",
        "classifier head(s) not loaded (the analysis uses the trunk only)",
    ]
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_deit_checkpoint_needs_arch_and_has_no_gating(image_dir, tmp_path, capsys):
    torch.manual_seed(0)
    deit = create_model("deit_tiny", img_size=32, patch_size=8, depth=2, num_classes=0)
    path = save_checkpoint(write(Weights(deit.state_dict()), "timm"), tmp_path / "deit.pth")
    out = tmp_path / "out"
    assert _cli([str(path), "--images", str(image_dir), "--out", str(out)]) == 2
    assert "no GPSA block" in capsys.readouterr().err and not out.exists()
    assert _cli([str(path), "--images", str(image_dir), "--out", str(out), "--arch", "deit_tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "attention_combined.png", "nonlocality.png"]
    assert _png(out / "attention_combined.png").size == figure_pixels(attention_figsize(2, 3, (32, 32)))
    assert _strict_json(out / "analysis.json")["analysis"]["kinds"] == ["mhsa", "mhsa"]


# --------------------------------------------------------------------------- training curves
def test_curves_from_log_tolerate_truncated_last_line(checkpoints, image_dir, tmp_path, capsys):
    gates = {
        0: [[0.7, 0.8, 0.6, 0.9], [0.7, 0.7, 0.7, 0.7]],
        10: [[0.5, 0.6, 0.7, 0.8], [0.2, 0.3, 0.1, 0.2]],
        20: [[0.4, 0.4, 0.4, 0.4], [0.1, 0.1, 0.1, 0.3]],
    }
    nonloc = {it: [[1.0 + it / 10 * k + h / 10 for h in range(HEADS)] for k in range(DEPTH)] for it in gates}
    log = _write_log(
        tmp_path / "convit_analysis.jsonl",
        [_record(it, gates[it], nonloc[it]) for it in gates],
        tail='{"iteration": 30, "epoch": 3, "layers": [{"ind',
    )  # killed while writing
    out = tmp_path / "out"
    assert _cli([str(checkpoints["vissl"]), "--images", str(image_dir), "--out", str(out), "--log", str(log)]) == 0
    assert "skipped the incomplete last line 4" in capsys.readouterr().out
    assert _png(out / "training_curves.png").size == CURVES_PIXELS == (1300, 480)
    data = _strict_json(out / "analysis.json")
    assert data["training_log"] == {"path": str(log), "records": 3, "truncated_line": 4}
    curves = data["figures"]["training_curves.png"]
    assert curves["iterations"] == [0, 10, 20] and curves["epochs"] == [0, 1, 2]
    assert curves["kinds"] == {"0": "gpsa", "1": "gpsa", "2": "mhsa", "3": "mhsa"}
    assert set(curves["gate_mean"]) == {"0", "1"}
    assert curves["gate_mean"]["1"] == pytest.approx([0.7, 0.2, 0.15])
    assert curves["nonlocality_mean"]["3"] == pytest.approx([1.15, 4.15, 7.15])


def test_curves_data_last_record_wins_and_figure_is_labelled():
    records = [
        _record(5, [[0.1] * 2], [[1.0] * 2, [3.0] * 2]),
        _record(0, [[0.9] * 2], [[1.0] * 2, [2.0] * 2]),
        _record(5, [[0.3] * 2], [[1.0] * 2, [4.0] * 2]),
    ]  # iteration 5 again (a resumed run)
    data = plots.curves_data(records)
    assert data["iterations"] == [0, 5] and data["gate_mean"]["0"] == pytest.approx([0.9, 0.3])
    assert data["nonlocality_mean"]["1"] == pytest.approx([2.0, 4.0])
    fig = plots.curves_figure(records)
    gate_ax, nonloc_ax = fig.axes
    assert "Gate" in gate_ax.get_title() and "Nonlocality" in nonloc_ax.get_title()
    assert gate_ax.get_xlabel() == nonloc_ax.get_xlabel() == "iteration"
    assert gate_ax.get_ylabel() == "gate σ(λ)" and nonloc_ax.get_ylabel() == "nonlocality (patches)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["layer 0 (GPSA)", "layer 1 (MHSA)"] and "gate at init σ(1) = 0.73" in labels
    assert "Training dynamics" in fig.get_suptitle()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"iteration": 1, "layers": []}\n', r"line 1: 'layers' must be a non-empty list"),
        ('{"epoch": 1}\n', r"line 1: 'iteration' must be an integer, got None"),
        (
            '{"iteration": 0, "layers": [{"index": 0, "kind": "gpsa", "nonlocality": {"combined": [1.0]}}]}\n',
            r"line 1: layers\[0\].gate: expected a non-empty list of numbers",
        ),
        (
            '{"iteration": 0, "layers": [{"index": 0, "kind": "conv", "nonlocality": {}}]}\n',
            r"line 1: layers\[0\].kind must be 'gpsa' or 'mhsa', got 'conv'",
        ),
        (
            '{"iteration": 0, "layers": [{"index": 0, "kind": "mhsa", "nonlocality": {"combined": ["x"]}}]}\n',
            r"line 1: layers\[0\].nonlocality.combined: expected a non-empty list of numbers",
        ),
        ('{"iteration": 0, "lay\n{"iteration": 1}\n', r"line 1: not valid JSON"),
        (
            '{"iteration": 0, "layers": [{"index": 0, "kind": "mhsa", "nonlocality": {"combined": [1]}}]}\n{"iter\n',
            r"line 2: not valid JSON",
        ),  # a bad line that ends with a newline was not cut off: an error
        ("\n\n", r"no records"),
        ('{"iteration": 0, "la', r"no records \(line 1 is incomplete\)"),
    ],
)
def test_bad_training_logs_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        read_training_log(path)


# --------------------------------------------------------------------------- errors leave nothing behind
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_images", r"image folder '.*nowhere' does not exist"),
        ("empty_images", r"no images under '.*empty' \(looked for .jpg"),
        ("unreadable_image", r"cannot read image '.*broken.png'"),
        ("query", r"query patch \(4, 0\) outside the 4x4 grid"),
        ("format", r"was declared timm but holds a vissl checkpoint"),
        ("missing_checkpoint", r"checkpoint '.*absent.pth' does not exist"),
        ("log", r"log.jsonl, line 1: not valid JSON"),
        ("mean", r"--mean needs 3 values \(one per channel\), got \[0.5\]"),
        ("image_size", r"image size 30 is not a positive multiple of the patch size 8"),
    ],
)
def test_bad_inputs_exit_2_with_clear_error_and_no_files(case, message, checkpoints, image_dir, tmp_path, capsys):
    images, checkpoint, extra = image_dir, checkpoints["vissl"], []
    if case == "missing_images":
        images = tmp_path / "nowhere"
    elif case == "empty_images":
        images = tmp_path / "empty"
        (images / "sub").mkdir(parents=True)
        (images / "sub" / "readme.txt").write_text("no images here")
    elif case == "unreadable_image":
        images = tmp_path / "broken"
        images.mkdir()
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    elif case == "query":
        extra = ["--query", "4", "0"]
    elif case == "format":
        extra = ["--format", "timm"]
    elif case == "missing_checkpoint":
        checkpoint = tmp_path / "absent.pth"
    elif case == "log":
        (tmp_path / "log.jsonl").write_text("not json\n{}\n")
        extra = ["--log", str(tmp_path / "log.jsonl")]
    elif case == "mean":
        extra = ["--mean", "0.5"]
    elif case == "image_size":
        extra = ["--image-size", "30"]
    out = tmp_path / "out"
    assert _cli([str(checkpoint), "--images", str(images), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convit-ssl analyze: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_existing_outputs_are_replaced_only_with_overwrite(checkpoints, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(checkpoints["timm"]), "--images", str(image_dir), "--out", str(out), "--num-images", "1"]
    assert _cli(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _cli(args[:-1] + ["2"]) == 2
    assert "analysis.json, gating.png, nonlocality.png" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _cli(args[:-1] + ["2", "--overwrite"]) == 0
    assert _strict_json(out / "analysis.json")["images"] == IMAGE_FILES[:2]
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_FIGURES)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_while_rendering_leaves_no_partial_files(existing, checkpoints, image_dir, tmp_path, monkeypatch):
    """The curves figure is rendered last: when it fails, the files already
    rendered must not appear in --out (nor temporary files)."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    log = _write_log(tmp_path / "log.jsonl", [_record(0, [[0.5] * HEADS] * 2, [[1.0] * HEADS] * DEPTH)])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "curves_figure", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_analysis(checkpoints["timm"], image_dir, out, log_path=log, log=lambda _: None)
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


# --------------------------------------------------------------------------- figures as objects
def test_figures_have_titles_labelled_axes_and_legends(state, image_dir):
    report = analyze(_expected_model(state, 1e-6), _expected_images(image_dir, IMAGE_FILES[:2], 32))
    gating = plots.gating_figure(report)
    (ax,) = gating.axes
    assert "Gating" in ax.get_title() and ax.get_xlabel() == "layer (GPSA blocks)" and "σ(λ)" in ax.get_ylabel()
    labels = [t.get_text() for t in gating.legends[0].get_texts()]
    assert labels == [f"head {h}" for h in range(HEADS)] + ["mean over heads", f"at init: σ(1) = {INITIAL_GATE:.2f}"]
    assert list(ax.get_xticks()) == [0, 1]

    nonloc = plots.nonlocality_figure(report)
    (ax,) = nonloc.axes
    assert "Nonlocality" in ax.get_title() and ax.get_xlabel() == "layer"
    assert ax.get_ylabel() == "nonlocality (patches)" and list(ax.get_xticks()) == list(range(DEPTH))
    labels = [t.get_text() for t in nonloc.legends[0].get_texts()]
    assert labels[: HEADS + 3] == [f"head {h}" for h in range(HEADS)] + [
        "mean (combined)",
        "mean (positional term)",
        "mean (content term)",
    ]
    assert labels[-1].startswith("uniform attention")

    image = np.random.default_rng(0).random((32, 32, 3))
    attention = plots.attention_figure(report, image)
    panels = attention.axes[:-1]  # the last axes is the colour bar
    assert len(panels) == DEPTH * HEADS
    assert [ax.get_title() for ax in panels[:HEADS]] == [f"head {h}" for h in range(HEADS)]
    assert [panels[r * HEADS].get_ylabel() for r in range(DEPTH)] == [
        "layer 0\nGPSA",
        "layer 1\nGPSA",
        "layer 2\nMHSA",
        "layer 3\nMHSA",
    ]
    assert attention.axes[-1].get_ylabel() == "weight / panel max"
    assert any("Query patch (2, 2)" in t.get_text() for t in attention.texts)
    positional = plots.attention_figure(report, image, term="positional")
    assert len(positional.axes) - 1 == GPSA_LAYERS * HEADS


def test_figure_data_and_errors(state, image_dir):
    report = analyze(_expected_model(state, 1e-6), _expected_images(image_dir, IMAGE_FILES[:1], 32))
    # uniform attention on a 1x3 grid: distances 0,1,2 / 1,0,1 / 2,1,0 -> 8/9
    assert plots.uniform_nonlocality([1, 3]) == pytest.approx(8 / 9)
    data = plots.nonlocality_data(report)
    assert data["uniform"] == plots.uniform_nonlocality([4, 4])
    assert data["combined_mean"] == pytest.approx([float(np.mean(r)) for r in data["combined"]])
    with pytest.raises(ValueError, match="unknown attention term 'content'"):
        plots.attention_data(report, "content")
    with pytest.raises(ValueError, match=r"does not tile the 4x4 patch grid"):
        plots.attention_figure(report, np.zeros((30, 32)))
    with pytest.raises(ValueError, match="no GPSA layers"):
        plots.gating_data({**report, "layers": report["layers"][GPSA_LAYERS:]})
    with pytest.raises(ValueError, match="not an analyze\\(\\) report"):
        plots.gating_figure({"grid": [4, 4]})


def test_save_png_is_atomic_and_sized(tmp_path, state, image_dir):
    report = analyze(_expected_model(state, 1e-6), _expected_images(image_dir, IMAGE_FILES[:1], 32))
    path = plots.save_png(plots.gating_figure(report), tmp_path / "g.png")
    assert Image.open(path).size == GATING_PIXELS and [p.name for p in tmp_path.iterdir()] == ["g.png"]
    with pytest.raises(FileNotFoundError):
        plots.save_png(plots.gating_figure(report), tmp_path / "missing" / "g.png")
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_find_images_sorted_by_relative_path_and_limited(image_dir):
    every = sorted(
        (
            p
            for p in image_dir.rglob("*")
            if p.suffix.lower() in (".png", ".jpg")
            and not any(part.startswith(".") for part in p.relative_to(image_dir).parts)
        ),
        key=lambda p: p.relative_to(image_dir).as_posix(),
    )
    assert [p.relative_to(image_dir).as_posix() for p in every] == IMAGE_FILES
    assert find_images(image_dir) == every and find_images(image_dir, 2) == every[:2]
    with pytest.raises(ValueError, match="the number of images must be at least 1, got 0"):
        find_images(image_dir, 0)
    with pytest.raises(ValueError, match="is not a folder"):
        find_images(every[0])


# --------------------------------------------------------------------------- tools/analyze.py
def test_tool_script(checkpoints, image_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(TOOL),
            str(checkpoints["vissl_convit"]),
            "--images",
            str(image_dir),
            "--out",
            str(out),
            "--num-images",
            "1",
            "--query",
            "0",
            "0",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert exit_info.value.code == 0 and "wrote:" in capsys.readouterr().out
    assert _strict_json(out / "analysis.json")["analysis"]["query"] == [0, 0]
    monkeypatch.setattr(
        sys,
        "argv",
        [str(TOOL), str(checkpoints["timm"]), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "out2")],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("convit-ssl analyze: error: image folder")
    assert not (tmp_path / "out2").exists()
