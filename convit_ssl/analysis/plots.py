"""Figures like the paper's, from `analyze()` reports and training logs.

Each figure has a data function (the numbers it shows, plain JSON data) and a
figure function (a `matplotlib.figure.Figure` drawn from those numbers);
`save_png` writes a figure atomically. Nothing here touches pyplot's global
state or the process-wide backend: figures are `Figure` objects with their
own Agg canvas, so importing this module is safe next to other matplotlib
users.

    report = analyze(model, images)                      # convit_ssl.analysis.report
    save_png(gating_figure(report), "gating.png")        # GATING_PIXELS
    save_png(nonlocality_figure(report), "nonlocality.png")
    save_png(attention_figure(report, display_image), "attention_combined.png")
    log = read_training_log("checkpoints/convit_analysis.jsonl")  # convit_ssl.analysis.training_log
    save_png(curves_figure(log.records), "training_curves.png")

Pixel sizes are fixed: `DPI` and the figure sizes below (inches), so every PNG
has a known size (`figure_pixels`); the attention grid grows with layers x heads
(`attention_figsize`).

The training log's schema and reader: `convit_ssl.analysis.training_log`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from convit_ssl.analysis.collect import GPSA_KIND, MHSA_KIND
from convit_ssl.analysis.training_log import check_record
from convit_ssl.files import PathLike, atomic_path
from convit_ssl.models.geometry import pairwise_distances

DPI = 100
GATING_FIGSIZE = (8.0, 4.8)  # 800 x 480 px
NONLOCALITY_FIGSIZE = (9.6, 4.8)  # 960 x 480 px
CURVES_FIGSIZE = (13.0, 4.8)  # 1300 x 480 px
ATTENTION_CELL = 1.3  # inches per panel (its longer image side)
ATTENTION_GAP = 0.08  # inches between panels
ATTENTION_MARGINS = {"left": 1.05, "right": 1.05, "top": 1.0, "bottom": 0.15}  # inches

TITLE_SIZE = 13
LABEL_SIZE = 11
TICK_SIZE = 10
LEGEND_SIZE = 9
PANEL_SIZE = 8
INITIAL_GATE = 1.0 / (1.0 + math.exp(-1.0))  # sigma(1): every gate at local init
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
TERMS = ("combined", "positional")
GPSA, MHSA = GPSA_KIND, MHSA_KIND


def figure_pixels(figsize: tuple[float, float], dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of a PNG saved from a figure of `figsize` inches."""
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


GATING_PIXELS = figure_pixels(GATING_FIGSIZE)
NONLOCALITY_PIXELS = figure_pixels(NONLOCALITY_FIGSIZE)
CURVES_PIXELS = figure_pixels(CURVES_FIGSIZE)


def attention_figsize(rows: int, cols: int, image_hw: tuple[int, int]) -> tuple[float, float]:
    """Figure size (inches) of an attention grid of rows x cols panels of an
    image of `image_hw` = (height, width) pixels: panels are ATTENTION_CELL
    inches along the image's longer side."""
    scale = ATTENTION_CELL / max(image_hw)
    cell_w, cell_h = image_hw[1] * scale, image_hw[0] * scale
    m = ATTENTION_MARGINS
    width = m["left"] + cols * cell_w + (cols - 1) * ATTENTION_GAP + m["right"]
    height = m["top"] + rows * cell_h + (rows - 1) * ATTENTION_GAP + m["bottom"]
    # whole pixels, so that the saved size is exactly figure_pixels(...)
    return round(width * DPI) / DPI, round(height * DPI) / DPI


# --------------------------------------------------------------------------- helpers
def _figure(figsize: tuple[float, float], layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: PathLike) -> Path:
    """Write `fig` as a PNG of exactly its figure size x DPI pixels, atomically
    (temporary file in the same folder, then rename); return the path."""
    path = Path(path)
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _array(values: Any) -> np.ndarray:
    """Nested lists with None (NaN/inf in a report) -> float array with NaN."""
    if isinstance(values, (list, tuple)):
        return np.array([_array(v) for v in values], dtype=float) if values else np.zeros(0)
    return np.array(np.nan if values is None else values, dtype=float)


def _plain(values: np.ndarray) -> Any:
    """Float array -> nested lists, NaN -> None (strict JSON)."""
    return [_plain(v) for v in values] if values.ndim else (float(values) if np.isfinite(values) else None)


def _mean(rows: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row has no finite value."""
    finite = np.isfinite(rows)
    count = finite.sum(axis=-1)
    total = np.where(finite, rows, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _head_colours(heads: int) -> list[Any]:
    if heads <= 10:
        return [colormaps["tab10"](h) for h in range(heads)]
    if heads <= 20:
        return [colormaps["tab20"](h) for h in range(heads)]
    return [colormaps["viridis"](h / (heads - 1)) for h in range(heads)]


def _layer_colours(layers: Sequence[int]) -> dict[int, Any]:
    top = max(max(layers, default=0), 1)
    return {i: colormaps["viridis"](0.9 * i / top) for i in layers}


def _jitter(heads: int, spread: float = 0.5) -> np.ndarray:
    """x offsets of the heads around each layer, so their points do not overlap."""
    return (np.arange(heads) - (heads - 1) / 2) * (spread / max(heads, 1))


def _head_points(ax, x: np.ndarray, values: np.ndarray, size: int) -> list[Any]:
    """One scatter series per head (column of `values`, rows at `x`), jittered; their legend handles."""
    heads = values.shape[1]
    return [
        ax.scatter(
            x + dx,
            values[:, h],
            s=size,
            color=colour,
            marker=MARKERS[h % len(MARKERS)],
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
            label=f"head {h}",
        )
        for h, (colour, dx) in enumerate(zip(_head_colours(heads), _jitter(heads), strict=True))
    ]


def _style(ax, title: str, xlabel: str, ylabel: str, title_size: int = LABEL_SIZE + 1) -> None:
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, alpha=0.3)


def _legend(fig: Figure, handles: Sequence[Any], loc: str = "outside right upper") -> None:
    """One legend for the figure, outside the axes on the right (two columns for many entries)."""
    ncols = 1 if len(handles) <= 18 else 2
    fig.legend(handles=list(handles), loc=loc, fontsize=LEGEND_SIZE, ncols=ncols, frameon=False)


def _check_report(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    try:
        layers = report["layers"]
        for layer in layers:
            layer["index"], layer["kind"], layer["nonlocality"]["combined"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"not an analyze() report (missing {e}); pass the dict convit_ssl.analysis.analyze returns"
        ) from e
    if not layers:
        raise ValueError("the report has no layers")
    return layers


# --------------------------------------------------------------------------- gating
def gating_data(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of the gating figure: per GPSA layer, sigma(lambda) of each head and their mean."""
    layers = [layer for layer in _check_report(report) if layer["kind"] == GPSA]
    if not layers:
        raise ValueError("the model has no GPSA layers: there are no gates to plot")
    gates = _array([layer["gate"] for layer in layers])
    return {
        "layers": [layer["index"] for layer in layers],
        "gate": _plain(gates),
        "gate_mean": _plain(_mean(gates)),
        "initial_gate": INITIAL_GATE,
    }


def gating_figure(report: Mapping[str, Any]) -> Figure:
    """sigma(lambda) per GPSA layer, heads as points, mean over heads as a line (GATING_PIXELS)."""
    data = gating_data(report)
    gates, x = _array(data["gate"]), np.array(data["layers"], dtype=float)
    fig = _figure(GATING_FIGSIZE)
    ax = fig.add_subplot()
    handles = _head_points(ax, x, gates, size=36)
    handles += ax.plot(
        x, _array(data["gate_mean"]), color="black", lw=2, marker="_", ms=14, zorder=4, label="mean over heads"
    )
    handles.append(ax.axhline(INITIAL_GATE, color="grey", ls="--", lw=1, label=f"at init: σ(1) = {INITIAL_GATE:.2f}"))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x)
    ax.set_xlim(x.min() - 0.6, x.max() + 0.6)
    _style(
        ax,
        "Gating per GPSA layer: weight of the positional attention",
        "layer (GPSA blocks)",
        "gate σ(λ)  (1 = positional, 0 = content)",
        TITLE_SIZE,
    )
    _legend(fig, handles)
    return fig


# --------------------------------------------------------------------------- nonlocality
def uniform_nonlocality(grid: Sequence[int]) -> float:
    """Nonlocality (patches) of a head attending uniformly to the (H, W) grid: a reference line."""
    return float(pairwise_distances((int(grid[0]), int(grid[1]))).double().mean())


def nonlocality_data(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of the nonlocality figure: per layer, the combined nonlocality
    of each head and the mean over heads of combined, positional and content
    (the last two None for MHSA layers), plus the uniform-attention reference."""
    layers = _check_report(report)
    combined = _array([layer["nonlocality"]["combined"] for layer in layers])
    data = {
        "layers": [layer["index"] for layer in layers],
        "kinds": [layer["kind"] for layer in layers],
        "combined": _plain(combined),
        "combined_mean": _plain(_mean(combined)),
    }
    for term in ("positional", "content"):
        data[f"{term}_mean"] = [
            _plain(_mean(_array(layer["nonlocality"][term]))) if term in layer["nonlocality"] else None
            for layer in layers
        ]
    data["uniform"] = uniform_nonlocality(report["grid"])
    data["num_images"] = report.get("num_images")
    return data


def nonlocality_figure(report: Mapping[str, Any]) -> Figure:
    """Nonlocality per layer: heads as points, means as lines (NONLOCALITY_PIXELS)."""
    data = nonlocality_data(report)
    combined, x = _array(data["combined"]), np.array(data["layers"], dtype=float)
    gpsa = [i for i, kind in zip(data["layers"], data["kinds"], strict=True) if kind == GPSA]
    fig = _figure(NONLOCALITY_FIGSIZE)
    ax = fig.add_subplot()
    if gpsa:
        ax.axvspan(min(gpsa) - 0.5, max(gpsa) + 0.5, color="#e8eef7", zorder=0)
        ax.text(
            min(gpsa) - 0.45,
            0.98,
            "GPSA",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=TICK_SIZE,
            color="#335",
        )
    mhsa = [i for i, kind in zip(data["layers"], data["kinds"], strict=True) if kind == MHSA]
    if mhsa:
        ax.text(
            min(mhsa) - 0.45,
            0.98,
            "MHSA (+ class token)",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=TICK_SIZE,
            color="#533",
        )
    handles = _head_points(ax, x, combined, size=30)
    handles += ax.plot(
        x, _array(data["combined_mean"]), color="black", lw=2, marker="o", ms=4, zorder=4, label="mean (combined)"
    )
    for term, style in (("positional", "--"), ("content", ":")):
        means = _array(data[f"{term}_mean"])
        if np.isfinite(means).any():
            handles += ax.plot(x, means, color="#555", lw=1.5, ls=style, zorder=4, label=f"mean ({term} term)")
    handles.append(
        ax.axhline(data["uniform"], color="#b44", lw=1, ls="-.", label=f"uniform attention ({data['uniform']:.2f})")
    )
    top = np.nanmax(np.concatenate([combined.ravel(), [data["uniform"]]]))
    ax.set_ylim(0, 1.12 * top)
    ax.set_xticks(x)
    ax.set_xlim(x.min() - 0.6, x.max() + 0.6)
    grid = report["grid"]
    _style(
        ax,
        f"Nonlocality per layer: attention-weighted distance to the query\n"
        f"({grid[0]}x{grid[1]} patch grid, mean over query patches and {data['num_images']} images)",
        "layer",
        "nonlocality (patches)",
        TITLE_SIZE,
    )
    _legend(fig, handles)
    return fig


# --------------------------------------------------------------------------- attention maps
def attention_data(report: Mapping[str, Any], term: str = "combined", image_index: int = 0) -> dict[str, Any]:
    """What an attention-grid figure shows: the layers (rows), the query, and
    per panel the maximum weight it is scaled by (the maps themselves are the
    report's ``layers[i].attention_map[term]``, image `image_index`)."""
    if term not in TERMS:
        raise ValueError(f"unknown attention term {term!r}; expected one of {', '.join(TERMS)}")
    layers = [layer for layer in _check_report(report) if term in layer.get("attention_map", {})]
    if not layers:
        raise ValueError(f"the report has no {term} attention maps")
    maps = np.stack([_panel_maps(layer, term, image_index) for layer in layers])  # (rows, heads, H, W)
    return {
        "term": term,
        "image": image_index,
        "query": list(report["query"]),
        "layers": [layer["index"] for layer in layers],
        "kinds": [layer["kind"] for layer in layers],
        "panel_max": _plain(np.nanmax(maps, axis=(2, 3))),
    }


def _panel_maps(layer: Mapping[str, Any], term: str, image_index: int) -> np.ndarray:
    maps = _array(layer["attention_map"][term])
    if term == "positional":  # (heads, H, W): the same for every image
        return maps
    if not 0 <= image_index < maps.shape[0]:
        raise ValueError(f"image_index {image_index} outside 0..{maps.shape[0] - 1}")
    return maps[image_index]


def _display(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) image -> (H, W) grey in [0, 1] for the panel background."""
    image = np.asarray(image, dtype=float)
    if image.ndim == 3 and image.shape[2] in (1, 3):
        image = image.mean(axis=2) if image.shape[2] == 3 else image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, 1|3) image, got shape {image.shape}")
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def attention_figure(
    report: Mapping[str, Any], image: np.ndarray, term: str = "combined", image_index: int = 0
) -> Figure:
    """Grid of attention maps of the query patch, rows = layers, columns = heads,
    over the input image (its grey version); each map is upsampled to the image
    (nearest: one block per patch), scaled to its own maximum and overlaid with
    alpha; the query patch is outlined. Size: `attention_figsize`.

    Args:
        report: `analyze()` output.
        image: the model input `image_index` before normalisation, (H_img, W_img[, C]);
            H_img / W_img must be the same multiple of the report's grid.
        term: "combined" (the attention the blocks use, all layers) or
            "positional" (GPSA layers; the same for every image).
    """
    data = attention_data(report, term, image_index)
    layers = {layer["index"]: layer for layer in report["layers"]}
    background = _display(image)
    grid_h, grid_w = report["grid"]
    img_h, img_w = background.shape
    if img_h % grid_h or img_w % grid_w or img_h // grid_h != img_w // grid_w:
        raise ValueError(f"image of {img_h}x{img_w} pixels does not tile the {grid_h}x{grid_w} patch grid")
    patch = img_h // grid_h
    rows, cols = len(data["layers"]), len(data["panel_max"][0])
    figsize = attention_figsize(rows, cols, (img_h, img_w))
    fig = _figure(figsize, layout=None)
    m, scale = ATTENTION_MARGINS, ATTENTION_CELL / max(img_h, img_w)
    cell_w, cell_h = img_w * scale, img_h * scale
    norm = Normalize(0.0, 1.0)
    cmap = "inferno"
    query_row, query_col = data["query"]
    for r, index in enumerate(data["layers"]):
        layer = layers[index]
        maps = _panel_maps(layer, term, image_index)
        for c in range(cols):
            left = m["left"] + c * (cell_w + ATTENTION_GAP)
            bottom = figsize[1] - m["top"] - (r + 1) * cell_h - r * ATTENTION_GAP
            ax = fig.add_axes((left / figsize[0], bottom / figsize[1], cell_w / figsize[0], cell_h / figsize[1]))
            ax.imshow(background, cmap="gray", vmin=0, vmax=1, extent=(0, img_w, img_h, 0), interpolation="antialiased")
            peak = data["panel_max"][r][c]
            shown = np.clip(maps[c] / peak if peak else maps[c], 0.0, 1.0)
            overlay = colormaps[cmap](norm(shown))
            overlay[..., 3] = 0.25 + 0.6 * shown  # weak attention lets the image show through
            ax.imshow(overlay, extent=(0, img_w, img_h, 0), interpolation="nearest")
            ax.add_patch(
                Rectangle((query_col * patch, query_row * patch), patch, patch, fill=False, edgecolor="cyan", lw=1.5)
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(
                0.03,
                0.97,
                _panel_label(layer, c, term),
                transform=ax.transAxes,
                va="top",
                ha="left",
                fontsize=PANEL_SIZE,
                color="black",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            )
            if r == 0:
                ax.set_title(f"head {c}", fontsize=LABEL_SIZE)
            if c == 0:
                ax.set_ylabel(f"layer {index}\n{layer['kind'].upper()}", fontsize=LABEL_SIZE)
    cax = fig.add_axes(
        (
            (figsize[0] - m["right"] + 0.2) / figsize[0],
            m["bottom"] / figsize[1] + 0.05,
            0.15 / figsize[0],
            0.8 * (figsize[1] - m["top"] - m["bottom"]) / figsize[1],
        )
    )
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("weight / panel max", fontsize=TICK_SIZE)
    bar.ax.tick_params(labelsize=PANEL_SIZE)
    what = "combined (gated) attention" if term == "combined" else "positional attention (GPSA)"
    source = "" if term == "positional" else f", image {image_index}"
    fig.text(
        0.5,
        1 - 0.1 / figsize[1],
        f"Query patch ({query_row}, {query_col}) [cyan]: {what}{source}",
        ha="center",
        va="top",
        fontsize=TITLE_SIZE if figsize[0] > 6 else LABEL_SIZE,
        wrap=True,
    )
    fig.text(0.5, 1 - 0.42 / figsize[1], _legend_line(term), ha="center", va="top", fontsize=PANEL_SIZE + 1, wrap=True)
    return fig


def _panel_label(layer: Mapping[str, Any], head: int, term: str) -> str:
    """Short numbers of the panel: gate and nonlocality (GPSA), class-token weight (MHSA)."""
    parts = []
    if layer["kind"] == GPSA:
        parts.append(f"σ {layer['gate'][head]:.2f}")
    nonloc = layer["nonlocality"].get(term)
    if nonloc is not None and nonloc[head] is not None:
        parts.append(f"d {nonloc[head]:.1f}")
    if term == "combined" and "class_token" in layer["attention_map"]:
        parts.append(f"cls {np.mean(_array(layer['attention_map']['class_token'])[:, head]):.2f}")
    return " ".join(parts)


def _legend_line(term: str) -> str:
    key = "σ: gate    d: nonlocality (patches)"
    return key + ("    cls: weight on the class token" if term == "combined" else "")


def curves_data(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers of the training-curves figure: iterations (sorted; for a
    repeated iteration, e.g. after a resumed run, the last record wins) and per
    layer the mean over heads of the gate (GPSA) and the combined nonlocality."""
    if not records:
        raise ValueError("no training-log records to plot")
    by_iteration = {int(check_record(dict(r))["iteration"]): r for r in records}
    iterations = sorted(by_iteration)
    kinds: dict[int, str] = {}
    for record in by_iteration.values():
        for layer in record["layers"]:
            kinds.setdefault(layer["index"], layer["kind"])
    gate: dict[str, list[Any]] = {}
    nonloc: dict[str, list[Any]] = {}
    for index in sorted(kinds):
        nonloc[str(index)] = []
        if kinds[index] == GPSA:
            gate[str(index)] = []
        for it in iterations:
            layer = next((entry for entry in by_iteration[it]["layers"] if entry["index"] == index), None)
            combined = None if layer is None else _mean(_array(layer["nonlocality"]["combined"]))
            nonloc[str(index)].append(None if combined is None else _plain(combined))
            if kinds[index] == GPSA:
                gate[str(index)].append(None if layer is None else _plain(_mean(_array(layer["gate"]))))
    return {
        "iterations": iterations,
        "epochs": [by_iteration[it].get("epoch") for it in iterations],
        "kinds": {str(i): kinds[i] for i in sorted(kinds)},
        "gate_mean": gate,
        "nonlocality_mean": nonloc,
        "num_images": by_iteration[iterations[-1]].get("num_images"),
    }


def curves_figure(records: Sequence[Mapping[str, Any]], source: str = "training log") -> Figure:
    """Gate (GPSA layers) and nonlocality (all layers) over training iterations,
    mean over heads, one line per layer (CURVES_PIXELS)."""
    data = curves_data(records)
    steps = np.array(data["iterations"], dtype=float)
    colours = _layer_colours([int(i) for i in data["kinds"]])
    fig = _figure(CURVES_FIGSIZE)
    gate_ax, nonloc_ax = fig.subplots(1, 2)
    marker = "o" if len(steps) <= 30 else None
    handles = []
    for key, kind in data["kinds"].items():
        style = {"color": colours[int(key)], "marker": marker, "ms": 4, "lw": 1.8, "ls": "-" if kind == GPSA else "--"}
        handles += nonloc_ax.plot(
            steps, _array(data["nonlocality_mean"][key]), label=f"layer {key} ({kind.upper()})", **style
        )
        if key in data["gate_mean"]:
            gate_ax.plot(steps, _array(data["gate_mean"][key]), **style)
    extra = [
        Line2D([], [], color="black", ls="-", label="solid: GPSA"),
        Line2D([], [], color="black", ls="--", label="dashed: MHSA"),
    ]
    if data["gate_mean"]:
        extra.append(
            gate_ax.axhline(INITIAL_GATE, color="grey", ls=":", lw=1.2, label=f"gate at init σ(1) = {INITIAL_GATE:.2f}")
        )
        gate_ax.set_ylim(-0.02, 1.02)
    else:
        gate_ax.text(0.5, 0.5, "no GPSA layers", transform=gate_ax.transAxes, ha="center", fontsize=LABEL_SIZE)
    _style(gate_ax, "Gate σ(λ), mean over heads (GPSA layers)", "iteration", "gate σ(λ)")
    _style(nonloc_ax, "Nonlocality, mean over heads", "iteration", "nonlocality (patches)")
    nonloc_ax.set_ylim(bottom=0)
    images = f", {data['num_images']} held-out images" if data["num_images"] else ""
    fig.suptitle(f"Training dynamics from {source} ({len(steps)} records{images})", fontsize=TITLE_SIZE)
    _legend(fig, handles + extra, "outside right center")
    return fig
