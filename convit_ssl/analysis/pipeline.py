"""The paper's figures for any ConViT checkpoint, written into a folder: what
`convit-ssl analyze` and `tools/analyze.py` run (`run_analysis`), and the demo.

Steps: load the checkpoint safely (any format the converter reads: vissl,
timm or the official release, VISSL's built-in convit; detected, or declared
with --format) into a convit_ssl `ConViT` built from the shapes (strict load);
load up to --num-images images from FOLDER (recursive, sorted by path,
resized and centre-cropped to the model's image size with bicubic
interpolation, normalised with --mean/--std, ImageNet's by default); run
`convit_ssl.analysis.analyze`; write into DIR:

    analysis.json             the analyze() report, the data of every figure, and what was analysed
    gating.png                sigma(lambda) per GPSA layer, heads as points   (GPSA models)
    nonlocality.png           nonlocality per layer, heads as points, means as lines
    attention_combined.png    attention of the query patch: layers x heads over the first image
    attention_positional.png  the positional term of the GPSA layers          (GPSA models)
    training_curves.png       gate and nonlocality over training               (with --log)

Everything is rendered into a temporary folder inside DIR first and renamed
into place at the end, so a failure leaves no partial files; existing files
are replaced only with --overwrite.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from convit_ssl.analysis import plots
from convit_ssl.analysis.report import analyze
from convit_ssl.analysis.training_log import read_training_log
from convit_ssl.checkpoints import loader
from convit_ssl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from convit_ssl.files import IMAGE_SUFFIXES, atomic_write_text, is_image
from convit_ssl.images import open_image
from convit_ssl.models import ConViT

DEFAULT_NUM_IMAGES = 8
JSON_NAME = "analysis.json"


# --------------------------------------------------------------------------- model
def load_model(
    path: os.PathLike, fmt: str = "auto", arch: str | None = None, norm_eps: float | None = None
) -> tuple[ConViT, dict[str, Any]]:
    """`convit_ssl.load_model` as the analyses use it: the trunk only (num_classes=0,
    float32, eval mode) of any source it reads (a checkpoint file of any format, a
    timm hub folder, a VISSL run folder).

    Returns:
        (model, info) with info = {"format", "model" (the ConViT kwargs), "notes"}.
    """
    model, info = loader.load_model(path, fmt=fmt, arch=arch, norm_eps=norm_eps)
    # the loader notes that it dropped the head "(keep_head=false)": say it in this command's terms
    notes = [note for note in info["notes"] if not note.endswith("(keep_head=false)")]
    if len(notes) < len(info["notes"]):
        notes.append("classifier head(s) not loaded (the analysis uses the trunk only)")
    return model, {"format": info["format"], "model": info["model"], "notes": notes}


# --------------------------------------------------------------------------- images
def find_images(folder: os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files under `folder` (recursive, IMAGE_SUFFIXES in any case), sorted by
    their path relative to `folder`, at most `limit` of them; hidden files and folders are skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"--images {str(folder)!r} is not a folder")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of images must be at least 1, got {limit}")
    found = list(itertools.islice(_walk_sorted(folder, set()), limit))
    if not found:
        raise ValueError(f"no images under {str(folder)!r} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    return found


def _walk_sorted(folder: Path, seen: set) -> Iterator[Path]:
    """Image files under `folder` lazily, in the order of their relative paths as
    strings (a folder "d" sorts as "d/"), so the first N come without listing a
    whole dataset; symlinked folders are followed once."""
    real = folder.resolve()
    if real in seen:
        return
    seen.add(real)
    with os.scandir(folder) as it:
        entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in it if not e.name.startswith(".")]
    for key, entry in sorted(entries, key=lambda pair: pair[0]):
        if key.endswith("/"):
            yield from _walk_sorted(Path(entry.path), seen)
        elif is_image(entry.name) and entry.is_file():
            yield Path(entry.path)


def load_images(
    paths: Sequence[Path],
    image_size: int,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as a normalised batch (B, C, S, S) and the same pixels before
    normalisation (B, C, S, S) in [0, 1] (for display), S = `image_size`:
    shorter side resized to S (bicubic), centre crop S x S, C = `in_chans`
    (RGB for 3, greyscale for 1)."""
    modes = {3: "RGB", 1: "L"}
    if in_chans not in modes:
        raise ValueError(f"the model takes {in_chans}-channel images; image folders give 1 (L) or 3 (RGB)")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != in_chans:
            raise ValueError(f"--{name} needs {in_chans} values (one per channel), got {list(values)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"--std values must be positive, got {list(std)}")
    to_pixels = T.Compose(
        [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size), T.ToTensor()]
    )
    normalise = T.Normalize(list(mean), list(std))
    pixels = []
    for path in paths:
        try:
            pixels.append(to_pixels(open_image(path, modes[in_chans])))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    display = torch.stack(pixels)
    return normalise(display), display


# --------------------------------------------------------------------------- outputs
def _planned(has_gpsa: bool, has_log: bool) -> list[str]:
    names = [JSON_NAME, "nonlocality.png", "attention_combined.png"]
    if has_gpsa:
        names[1:1] = ["gating.png"]
        names.append("attention_positional.png")
    if has_log:
        names.append("training_curves.png")
    return names


def _render(
    report: dict[str, Any], display: torch.Tensor, training_log: Any, staging: Path
) -> dict[str, dict[str, Any]]:
    """Write every figure into `staging`; return {file name: the numbers it shows}."""
    image = display[0].permute(1, 2, 0).numpy()
    has_gpsa = "gpsa" in report["kinds"]
    figures: dict[str, dict[str, Any]] = {}
    if has_gpsa:
        plots.save_png(plots.gating_figure(report), staging / "gating.png")
        figures["gating.png"] = plots.gating_data(report)
    plots.save_png(plots.nonlocality_figure(report), staging / "nonlocality.png")
    figures["nonlocality.png"] = plots.nonlocality_data(report)
    for term in ("combined", "positional") if has_gpsa else ("combined",):
        name = f"attention_{term}.png"
        plots.save_png(plots.attention_figure(report, image, term), staging / name)
        figures[name] = {
            **plots.attention_data(report, term),
            "maps": f"analysis.layers[*].attention_map.{term}" + ("" if term == "positional" else "[0]"),
        }
    if training_log is not None:
        records = training_log.records
        plots.save_png(plots.curves_figure(records, source=training_log.path.name), staging / "training_curves.png")
        figures["training_curves.png"] = plots.curves_data(records)
    return figures


def _write_json(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(data, allow_nan=False) + "\n")


def run_analysis(
    checkpoint: os.PathLike,
    images: os.PathLike,
    out: os.PathLike,
    *,
    fmt: str = "auto",
    arch: str | None = None,
    norm_eps: float | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    query: Sequence[int] | None = None,
    log_path: os.PathLike | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Analyse `checkpoint` on the images of `images` and write analysis.json and
    the figures into `out`; return the written paths (see the module docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    training_log = read_training_log(log_path) if log_path is not None else None  # cheap checks first
    paths = find_images(images, num_images)
    model, info = load_model(checkpoint, fmt, arch, norm_eps)
    size = model.img_size[0] if image_size is None else int(image_size)
    if size < 1 or size % model.patch_size:
        raise ValueError(f"image size {size} is not a positive multiple of the patch size {model.patch_size}")
    names = _planned(model.num_gpsa_layers > 0, training_log is not None)
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already in {str(out)!r}; pass --overwrite to replace")
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad --device {device!r}: {e}") from e
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but CUDA is not available")

    batch, display = load_images(paths, size, model.patch_embed.proj.in_channels, mean, std)
    report = analyze(model.to(target), batch, query)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".analyze-", dir=out))
    written: list[Path] = []
    try:
        figures = _render(report, display, training_log, staging)
        root = Path(images)
        _write_json(
            {
                "checkpoint": str(checkpoint),
                **info,
                "images": [p.relative_to(root).as_posix() for p in paths],
                "image_size": [size, size],
                "normalisation": {"mean": list(mean), "std": list(std)},
                "training_log": None
                if training_log is None
                else {
                    "path": str(training_log.path),
                    "records": len(training_log.records),
                    "truncated_line": training_log.truncated_line,
                },
                "analysis": report,
                "figures": figures,
            },
            staging / JSON_NAME,
        )
        assert sorted(p.name for p in staging.iterdir()) == sorted(names), "rendered files differ from the plan"
        for name in names:
            os.replace(staging / name, out / name)
            written.append(out / name)
    except BaseException:
        if created and not written:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"analysed {checkpoint} ({info['format']}): " + ", ".join(f"{k}={v}" for k, v in info["model"].items()))
    for note in info["notes"]:
        log(f"  note: {note}")
    log(
        f"  {len(paths)} images from {images} at {size}x{size}, query patch {tuple(report['query'])} "
        f"of the {report['grid'][0]}x{report['grid'][1]} grid"
    )
    if training_log is not None and training_log.truncated_line is not None:
        log(f"  note: skipped the incomplete last line {training_log.truncated_line} of {training_log.path}")
    log("wrote:")
    for path in written:
        log(f"  {path}")
    return written
