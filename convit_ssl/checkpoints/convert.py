"""Checkpoint conversion between formats, as a straight pipeline of steps::

    read_weights (loader)  ->  plan_target  ->  formats.write  ->  verify  ->  save
    source -> canonical        eps, resample      target object    source vs     atomic file
    weights + model kwargs     (pure)                              target        or hub folder

`convert(ConvertConfig(...))` runs them and returns a report; `convit-ssl
convert config=...` (convit_ssl.cli.convert) reads the config from YAML. Each
step is a function of what the previous returned (`Loaded`, `Target`,
`Verification`); nothing here imports VISSL. Verification runs the source in its
own implementation (timm's for timm and vit files, convit_ssl's trunk with
VISSL's head layout for vissl files) and the written object strictly loaded into
the target's; a vissl_convit file runs in VISSL's built-in trunk, which the
caller passes (`vissl_convit_trunk=convit_ssl.vissl.model.builtin_convit.build_vissl_convit`).
A timm or vit target whose `output` ends in `/` is written as a hub folder,
verified by `timm.create_model("local-dir:...")`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convit_ssl.checkpoints import hub, references
from convit_ssl.checkpoints.formats import FORMATS, NETWORKS, Weights, read, unwrap_state_dict, vissl_model_parts, write
from convit_ssl.checkpoints.infer import build_convit
from convit_ssl.checkpoints.io import CheckpointError, save_checkpoint
from convit_ssl.checkpoints.loader import Loaded, read_weights
from convit_ssl.checkpoints.resample import resample_state_dict, resize_patch_embed_state_dict
from convit_ssl.checkpoints.vissl_convit import VISSL_CONVIT_NORM_EPS
from convit_ssl.models.geometry import patch_grid, to_pair

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Forward = Callable[[Tensor], Tensor]
# VISSL's built-in convit trunk holding a vissl_convit checkpoint: (checkpoint, ConViT kwargs) -> forward
TrunkBuilder = Callable[[Any, dict[str, Any]], Forward]


@dataclass
class ConvertConfig:
    """Fields of a conversion config (configs/convert/*.yaml)."""

    input: str | None = None
    output: str | None = None
    source_format: str = "auto"  # auto | vissl | timm | vissl_convit | vit
    target_format: str | None = None  # vissl | timm | vissl_convit | vit
    arch: str | None = None  # null: read the architecture from tensor shapes (or a hub config.json)
    num_heads: int | None = None  # heads of a ViT/DeiT (not visible in its shapes); null: from arch or config.json
    network: str = "student"  # VISSL DINO / MoCo checkpoints: student | teacher (the momentum teacher)
    keep_head: bool = True  # carry the classifier over (VISSL mlp/eval_mlp <-> timm head)
    head_index: int = 0  # which VISSL head becomes timm's head
    bn_eps: float = 1e-5  # eps of an eval_mlp head's BatchNorm (VISSL's HEAD.BATCHNORM_EPS)
    norm_eps: float | None = None  # LayerNorm eps of the weights (null: 1e-6, or 1e-5 for vissl_convit)
    image_size: Any | None = None  # int or [h, w]: resample the position embedding to this size
    patch_size: int | None = None  # new patch size: FlexiViT pseudo-inverse resize of the patch kernel
    dtype: str | None = None  # null keeps the checkpoint's dtype; float32 | float16 | bfloat16
    verify: bool = True  # compare source and target outputs on a random batch
    verify_batch: int = 2
    verify_tolerance: float = 1e-4  # max |source - target| (fp32) accepted
    overwrite: bool = False
    seed: int = 0
    # preprocessing recorded in a hub folder's pretrained_cfg (null: the source hub folder's, else ImageNet's)
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    @property
    def folder_output(self) -> bool:
        return str(self.output).endswith("/")


def check_config(cfg: ConvertConfig) -> None:
    """A ValueError naming the first field that cannot be used; FileExistsError for an output kept."""
    for name in ("input", "output", "target_format"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is not set (give {name}=...)")
    if cfg.source_format != "auto" and cfg.source_format not in FORMATS:
        raise ValueError(f"source_format {cfg.source_format!r} is not one of auto, {', '.join(FORMATS)}")
    if cfg.target_format not in FORMATS:
        raise ValueError(f"target_format {cfg.target_format!r} is not one of {', '.join(FORMATS)}")
    if cfg.network not in NETWORKS:
        raise ValueError(f"network {cfg.network!r} is not one of {', '.join(NETWORKS)}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)} (or null to keep)")
    if cfg.folder_output and cfg.target_format not in ("timm", "vit"):
        raise ValueError(f"output {cfg.output!r} ends in '/' (a hub folder), which only timm and vit targets write")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output!r} exists; pass overwrite=true to replace it")


# ---------------------------------------------------------------- step 1: read
def read_step(cfg: ConvertConfig) -> Loaded:
    """The source as canonical weights and the ConViT kwargs that hold them (the loader's rules)."""
    loaded = read_weights(
        cfg.input,
        fmt=cfg.source_format,
        arch=cfg.arch,
        num_heads=cfg.num_heads,
        network=cfg.network,
        norm_eps=cfg.norm_eps,
        keep_head=cfg.keep_head,
        head_index=cfg.head_index,
        bn_eps=cfg.bn_eps,
        dtype=None if cfg.dtype is None else DTYPES[cfg.dtype],
    )
    notes = list(loaded.weights.notes)
    if cfg.dtype is not None:
        notes.append(f"cast to {cfg.dtype} (verification runs both implementations on the cast weights)")
    if loaded.fmt == "vissl_convit":
        notes.append(
            f"LayerNorm eps {loaded.kwargs['norm_eps']} (VISSL's built-in convit uses 1e-5): "
            "build the target model with norm_eps to match"
        )
    return replace(loaded, weights=replace(loaded.weights, notes=notes))


# ---------------------------------------------------------------- step 2: the target's weights and model
@dataclass(frozen=True)
class Target:
    """The weights to write and the ConViT kwargs of the model that holds them."""

    weights: Weights
    kwargs: dict[str, Any]


def plan_target(loaded: Loaded, cfg: ConvertConfig) -> Target:
    """The target's LayerNorm eps (VISSL's built-in trunk has 1e-5), and the weights
    resampled to a new patch or image size if asked."""
    kwargs, notes = dict(loaded.kwargs), list(loaded.weights.notes)
    if cfg.target_format == "vissl_convit" and kwargs["norm_eps"] != VISSL_CONVIT_NORM_EPS:
        notes.append(
            f"VISSL's built-in trunk has LayerNorm eps {VISSL_CONVIT_NORM_EPS}, these weights "
            f"{kwargs['norm_eps']}: it computes a slightly different function; verified against "
            "convit_ssl at its eps"
        )
        kwargs["norm_eps"] = VISSL_CONVIT_NORM_EPS
    if cfg.folder_output and kwargs["norm_eps"] != 1e-6:
        raise CheckpointError(
            f"these weights have LayerNorm eps {kwargs['norm_eps']}; timm's ConVit and ViT use 1e-6 "
            "and a hub folder cannot record another: write a single timm file (output without '/')"
        )
    trunk, kwargs, resample_notes = resample(
        loaded.weights.trunk, kwargs, cfg.image_size, cfg.patch_size, square_only=cfg.target_format != "vissl"
    )
    return Target(Weights(trunk, loaded.weights.head, notes + resample_notes), kwargs)


def resample(
    trunk: dict[str, Tensor],
    kwargs: dict[str, Any],
    image_size: Any = None,
    patch_size: int | None = None,
    square_only: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """(trunk, kwargs, notes) for a new patch size (FlexiViT resize of the patch kernel,
    same grid unless `image_size` is given) and/or image size (bicubic position embedding)."""
    kwargs, notes = dict(kwargs), []
    old_patch = kwargs["patch_size"]
    old_grid = patch_grid(kwargs["img_size"], old_patch)
    if patch_size is not None and patch_size != old_patch:
        trunk = resize_patch_embed_state_dict(trunk, patch_size)
        kwargs["patch_size"] = patch_size
        notes.append(f"patch size {old_patch} -> {patch_size} (FlexiViT pseudo-inverse resize of the patch kernel)")
    if image_size is None and patch_size is not None:
        image_size = [g * kwargs["patch_size"] for g in old_grid]  # same grid
    if image_size is not None:
        new_grid = patch_grid(image_size, kwargs["patch_size"])
        if new_grid[0] != new_grid[1] and square_only:
            raise CheckpointError(
                f"image_size {image_size} gives a {new_grid[0]}x{new_grid[1]} patch grid: "
                "timm, vit and vissl_convit ConViTs take square grids only (convit_ssl's vissl "
                "format takes any)"
            )
        if new_grid != old_grid and kwargs["use_pos_embed"]:
            trunk = resample_state_dict(trunk, new_grid, old_grid)
            notes.append(
                f"position embedding resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} (bicubic)"
            )
        kwargs["img_size"] = tuple(g * kwargs["patch_size"] for g in new_grid)
    return trunk, kwargs, notes


# ---------------------------------------------------------------- step 4: verify
def source_model(
    obj: Any,
    fmt: str,
    weights: Weights,
    kwargs: dict[str, Any],
    head_index: int = 0,
    bn_eps: float = 1e-5,
    vissl_convit_trunk: TrunkBuilder | None = None,
) -> Forward:
    """The checkpoint `obj` of format `fmt` run by its own implementation: timm's
    ConVit for timm files, timm's VisionTransformer for vit files (their own
    tensors), and for VISSL files the trunk (convit_ssl's for vissl, VISSL's
    built-in one for vissl_convit) followed by the VISSL head as stored, unfolded."""
    if fmt == "timm":
        return references.timm_convit(write(Weights(weights.trunk, weights.head), "timm"), kwargs)
    if fmt == "vit":
        state = {k.removeprefix("module."): v for k, v in unwrap_state_dict(obj)[0].items()}
        if weights.head is None:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        return references.timm_vit(state, kwargs)
    if fmt == "vissl_convit":
        if vissl_convit_trunk is None:
            raise CheckpointError(
                "verifying vissl_convit weights runs them in VISSL's built-in convit trunk: pass "
                "vissl_convit_trunk=convit_ssl.vissl.model.builtin_convit.build_vissl_convit (it imports "
                "VISSL), or verify=false"
            )
        trunk: Forward = vissl_convit_trunk(obj, kwargs)
    else:
        trunk = build_convit(weights.trunk, kwargs)
    if weights.head is None:
        return trunk
    head = references.vissl_head(vissl_model_parts(obj)[1], head_index, bn_eps)
    return lambda x: head(trunk(x))


def target_model(
    out: dict[str, Any], fmt: str, kwargs: dict[str, Any], vissl_convit_trunk: TrunkBuilder | None = None
) -> Forward:
    """The written object loaded strictly into the target implementation."""
    if fmt == "timm":
        return references.timm_convit(out, kwargs)
    if fmt == "vit":
        return references.timm_vit(out, kwargs)
    return source_model(out, fmt, read(out, fmt), kwargs, vissl_convit_trunk=vissl_convit_trunk)


@dataclass(frozen=True)
class Verification:
    """What was compared, and the largest absolute difference found."""

    text: str
    max_abs_diff: float


@torch.no_grad()
def verify(
    loaded: Loaded,
    target: Target,
    target_forward: Forward,
    cfg: ConvertConfig,
    vissl_convit_trunk: TrunkBuilder | None = None,
) -> Verification:
    """Random batches through the source implementation, the target (`target_forward`)
    and convit_ssl on the unconverted weights; a CheckpointError above the tolerance.

    Without resampling, source and target are compared directly. With a new image
    size, the target is compared with convit_ssl resampling the original position
    embedding at forward time (timm and VISSL's trunk run at one size only). With a
    new patch size the function changes by design: the target must load and be finite.
    Into VISSL's built-in trunk (LayerNorm eps 1e-5) other weights are compared with
    convit_ssl at that eps."""
    weights, kwargs = loaded.weights, loaded.kwargs
    if cfg.target_format == "vissl_convit" and kwargs["norm_eps"] != target.kwargs["norm_eps"]:
        source = reference = build_convit(
            weights.trunk, {**kwargs, "norm_eps": target.kwargs["norm_eps"]}, weights.head
        )
    else:
        reference = build_convit(weights.trunk, kwargs, weights.head)
        # a headless vissl file runs on convit_ssl's trunk alone: that is the reference itself
        source = (
            reference
            if loaded.fmt == "vissl" and weights.head is None
            else source_model(
                loaded.source.obj, loaded.fmt, weights, kwargs, cfg.head_index, cfg.bn_eps, vissl_convit_trunk
            )
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    x_src = torch.randn(cfg.verify_batch, kwargs["in_chans"], *to_pair(kwargs["img_size"]), generator=generator)
    x_tgt = torch.randn(
        cfg.verify_batch, target.kwargs["in_chans"], *to_pair(target.kwargs["img_size"]), generator=generator
    )
    diffs: dict[str, float] = {}
    y_source = source(x_src).float()
    if source is not reference:
        diffs["source vs convit_ssl"] = (y_source - reference(x_src).float()).abs().max().item()
    unchecked = ""
    if target.kwargs["patch_size"] != kwargs["patch_size"]:
        if not torch.isfinite(target_forward(x_tgt)).all():
            raise CheckpointError("verification failed: the converted model gives non-finite outputs")
        unchecked = "target outputs not compared (the patch size changed)"
    elif to_pair(target.kwargs["img_size"]) == to_pair(kwargs["img_size"]):
        diffs["source vs target"] = (y_source - target_forward(x_src).float()).abs().max().item()
    else:
        diffs["target vs convit_ssl resampling at forward time"] = (
            (target_forward(x_tgt).float() - reference(x_tgt).float()).abs().max().item()
        )
    text = "strict load into the target; " + ", ".join(
        [f"max |{k}| = {v:.3g}" for k, v in diffs.items()] + ([unchecked] if unchecked else [])
    )
    worst = max(diffs.values(), default=0.0)
    if worst > cfg.verify_tolerance:
        raise CheckpointError(f"verification failed: {text} > tolerance {cfg.verify_tolerance}")
    return Verification(text, worst)


# ---------------------------------------------------------------- the pipeline
@dataclass
class Report:
    """What `convert` did (returned as a dict by `convert`)."""

    source_format: str
    target_format: str
    model: dict[str, Any]
    head_classes: int | None
    notes: list[str] = field(default_factory=list)
    verification: str = "skipped (verify=false)"
    max_abs_diff: float | None = None
    seconds: float = 0.0


def convert(cfg: ConvertConfig, vissl_convit_trunk: TrunkBuilder | None = None) -> dict[str, Any]:
    """Run one conversion and save its output atomically; return the report as a dict
    (formats, model, head_classes, notes, verification, max_abs_diff, seconds)."""
    start = time.perf_counter()
    check_config(cfg)
    loaded = read_step(cfg)
    target = plan_target(loaded, cfg)
    out = write(target.weights, cfg.target_format)

    def verified(target_forward: Forward | None = None) -> Verification | None:
        if not cfg.verify:
            return None
        if target_forward is None:
            target_forward = target_model(out, cfg.target_format, target.kwargs, vissl_convit_trunk)
        return verify(loaded, target, target_forward, cfg, vissl_convit_trunk)

    if cfg.folder_output:
        num_classes = int(out["head.weight"].shape[0]) if "head.weight" in out else 0
        preprocessing = {
            **hub.preprocessing_of(loaded.source.hub_config),
            **{k: getattr(cfg, k) for k in ("mean", "std", "interpolation", "crop_pct") if getattr(cfg, k) is not None},
        }
        make = hub.vit_hub_config if cfg.target_format == "vit" else hub.convit_hub_config
        with hub.staged_folder(cfg.output.rstrip("/"), cfg.overwrite) as staging:
            hub.write_hub_folder(staging, out, make(target.kwargs, num_classes, preprocessing))
            verification = verified(hub.load_with_timm(staging) if cfg.verify else None)
            if verification is not None:
                verification = replace(
                    verification, text=verification.text + ' (the folder loaded by timm.create_model("local-dir:..."))'
                )
    else:
        verification = verified()
        save_checkpoint(out, cfg.output, overwrite=cfg.overwrite)
    head = target.weights.head
    report = Report(
        loaded.fmt,
        cfg.target_format,
        {k: v for k, v in target.kwargs.items() if k != "num_classes"},
        None if head is None else int(head["weight"].shape[0]),
        target.weights.notes,
        **(
            {}
            if verification is None
            else {"verification": verification.text, "max_abs_diff": verification.max_abs_diff}
        ),
        seconds=round(time.perf_counter() - start, 3),
    )
    return {k: v for k, v in asdict(report).items() if not (k == "max_abs_diff" and v is None)}


def format_report(cfg: ConvertConfig, report: dict[str, Any]) -> str:
    """The report as the lines `convit-ssl convert` prints."""
    lines = [
        f"converted {cfg.input} ({report['source_format']}) -> {cfg.output} ({report['target_format']})",
        "  model: " + ", ".join(f"{k}={v}" for k, v in report["model"].items()),
        f"  head: {report['head_classes']} classes" if report["head_classes"] else "  head: none",
    ]
    lines += [f"  note: {note}" for note in report["notes"]]
    lines.append(f"  verification: {report['verification']}")
    lines.append(f"  {report['seconds']} s")
    return "\n".join(lines)
