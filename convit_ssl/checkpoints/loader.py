"""The one loader: any checkpoint source convit_ssl reads -> a convit_ssl `ConViT`.

Sources: a checkpoint file (torch or ``.safetensors``) of any format in
`convit_ssl.checkpoints.formats.FORMATS` (a VISSL checkpoint, a timm /
official ConViT file or training checkpoint, a DeiT / ViT, VISSL's built-in
convit), a timm hub folder (``config.json`` + weights), or a VISSL run folder
(its final checkpoint by phase number, else ``checkpoint.torch``); the student
or, for a DINO / MoCo run, the momentum teacher. The rules are written once
here and used by the converter and the analyses::

    model, info = convit_ssl.load_model("run/")                  # a VISSL run's final trunk
    model, info = convit_ssl.load_model("convit_tiny/", keep_head=True)  # a timm hub folder, with its classifier
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convit_ssl.checkpoints import hub, run_folder
from convit_ssl.checkpoints.formats import FORMATS, Weights, detect_format, read, select_network
from convit_ssl.checkpoints.infer import build_convit, check_trunk, infer_model_kwargs
from convit_ssl.checkpoints.io import CheckpointError, load_checkpoint
from convit_ssl.checkpoints.vissl_convit import VISSL_CONVIT_NORM_EPS
from convit_ssl.checkpoints.vit import DEIT_ARCHS, heads_from_timm_name
from convit_ssl.files import PathLike
from convit_ssl.models import ConViT


@dataclass
class Source:
    """A checkpoint as read: the loaded object, a hub folder's config.json, what was read from where."""

    obj: Any
    hub_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def read_source(path: PathLike) -> Source:
    """A file, a timm hub folder, or a VISSL run folder (its final checkpoint, else
    the checkpoint.torch link to its latest one), loaded with weights_only=True."""
    folder = Path(path)
    if not folder.is_dir():
        return Source(load_checkpoint(folder))
    if hub.is_hub_folder(folder):
        state_dict, config, name = hub.read_hub_folder(folder)
        return Source(
            state_dict, config, [f"hub folder: {name} with config.json (architecture {config['architecture']})"]
        )
    final = run_folder.final_checkpoint(folder)
    if final is not None:
        return Source(load_checkpoint(final), None, [f"VISSL run folder: its final checkpoint {final.name}"])
    latest = folder / run_folder.CHECKPOINT_LINK
    if latest.is_symlink() or latest.is_file():
        return Source(load_checkpoint(latest), None, [f"VISSL run folder: checkpoint.torch -> {latest.resolve().name}"])
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"folder {str(path)!r} {'is empty' if not present else f'holds no checkpoint (found {present})'}: expected a "
        "timm hub folder (config.json with model.safetensors or pytorch_model.bin), a VISSL run folder "
        "(model_final_checkpoint_phase*.torch or checkpoint.torch), or give a checkpoint file"
    )


def default_norm_eps(fmt: str) -> float:
    """LayerNorm eps of weights in format `fmt`: VISSL's built-in convit 1e-5, everything else timm's 1e-6."""
    return VISSL_CONVIT_NORM_EPS if fmt == "vissl_convit" else 1e-6


def architecture_hint(
    fmt: str, hub_config: dict[str, Any] | None, arch: str | None, num_heads: int | None, where: str
) -> tuple[str | None, int | None]:
    """(arch, num_heads) for shape inference: those given, else a hub folder's config.json;
    a ViT / DeiT, whose head count its shapes do not show, needs one of them."""
    if fmt == "vit" and arch is not None and arch not in DEIT_ARCHS:
        raise CheckpointError(
            f"{where!r} is a ViT / DeiT (timm's VisionTransformer, no GPSA block): it converts to "
            f"the DeiT baselines, not {arch}; give arch={' or '.join(DEIT_ARCHS)}, "
            "or arch=null with num_heads"
        )
    if hub_config is not None:
        name = str(hub_config["architecture"])
        model_args = hub_config.get("model_args") or {}
        if "distilled" in name:
            raise CheckpointError(
                f"{where!r} is a distilled DeiT ({name}: distillation token and head): convert "
                "the non-distilled deit_*_patch16_224 weights"
            )
        if fmt == "vit":
            num_heads = num_heads or model_args.get("num_heads") or heads_from_timm_name(name)
        elif arch is None and name.split(".")[0] in hub.TIMM_CONVITS:
            arch = name.split(".")[0] if "num_heads" not in model_args else None
            num_heads = num_heads or model_args.get("num_heads")
    if fmt == "vit" and arch is None and num_heads is None:
        raise CheckpointError(
            f"{where!r} is a ViT / DeiT: its number of heads is not visible in tensor shapes; "
            f"give arch={' or '.join(DEIT_ARCHS)} or num_heads=N"
        )
    return arch, num_heads


def _cast(node: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors of a nested checkpoint cast to `dtype`."""
    if isinstance(node, torch.Tensor):
        return node.to(dtype) if node.is_floating_point() else node
    if isinstance(node, dict):
        return {k: _cast(v, dtype) for k, v in node.items()}
    return node


@dataclass
class Loaded:
    """What `read_weights` found: the canonical weights, the ConViT keyword arguments
    they need, the detected format, the source as read."""

    weights: Weights
    kwargs: dict[str, Any]
    fmt: str
    source: Source


def read_weights(
    path: PathLike,
    *,
    fmt: str = "auto",
    arch: str | None = None,
    num_heads: int | None = None,
    network: str = "student",
    norm_eps: float | None = None,
    keep_head: bool = False,
    head_index: int = 0,
    bn_eps: float = 1e-5,
    dtype: torch.dtype | None = None,
) -> Loaded:
    """Read any source as canonical weights (`Weights`: our trunk's state dict, a timm-style
    head) and the ConViT keyword arguments that hold them, checked against each other.
    `dtype` casts the checkpoint's floating-point tensors first (None keeps them)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    source = read_source(path)
    source.obj = select_network(source.obj, network)
    if dtype is not None:
        source.obj = _cast(source.obj, dtype)
    detected = detect_format(source.obj)
    if fmt not in ("auto", detected):
        raise CheckpointError(
            f"{str(path)!r} was declared {fmt} but holds a {detected} checkpoint (give {detected} or auto)"
        )
    arch, num_heads = architecture_hint(detected, source.hub_config, arch, num_heads, str(path))
    weights = read(source.obj, detected, keep_head=keep_head, head_index=head_index, bn_eps=bn_eps)
    weights.notes[:0] = source.notes + (["the momentum teacher (network=teacher)"] if network == "teacher" else [])
    kwargs = infer_model_kwargs(weights.trunk, arch, num_heads)
    kwargs["norm_eps"] = default_norm_eps(detected) if norm_eps is None else norm_eps
    check_trunk(weights.trunk, kwargs)
    return Loaded(weights, kwargs, detected, source)


def load_model(
    path: PathLike,
    *,
    fmt: str = "auto",
    arch: str | None = None,
    num_heads: int | None = None,
    network: str = "student",
    norm_eps: float | None = None,
    keep_head: bool = False,
) -> tuple[ConViT, dict[str, Any]]:
    """A convit_ssl `ConViT` (float32, eval mode) from any source `read_source` reads.

    Args:
        path: a checkpoint file, a timm hub folder or a VISSL run folder.
        fmt: "auto" (detect) or one of FORMATS; a declared format the file contradicts is an error.
        arch, num_heads: needed only where the shapes do not show the head count (a ViT / DeiT, or no GPSA
            block); a hub folder's config.json supplies them.
        network: "student", or "teacher" for the momentum teacher of a VISSL DINO / MoCo run.
        norm_eps: LayerNorm eps (default: 1e-6, or 1e-5 for VISSL's built-in convit).
        keep_head: load the classifier too (num_classes from its shape); else num_classes=0.

    Returns:
        (model, info) with info = {"format", "model" (the ConViT kwargs), "head_classes", "notes"}.
    """
    loaded = read_weights(
        path, fmt=fmt, arch=arch, num_heads=num_heads, network=network, norm_eps=norm_eps, keep_head=keep_head
    )
    weights = loaded.weights
    model = build_convit(weights.trunk, loaded.kwargs, weights.head if keep_head else None)
    if loaded.source.hub_config is not None:  # the preprocessing the weights were published with
        model.pretrained_cfg.update(
            {
                k: tuple(v) if isinstance(v, list) else v  # as timm holds them
                for k, v in hub.preprocessing_of(loaded.source.hub_config).items()
            }
        )
    info = {
        "format": loaded.fmt,
        "model": {k: v for k, v in loaded.kwargs.items() if k != "num_classes"},
        "head_classes": None if weights.head is None else int(weights.head["weight"].shape[0]),
        "notes": weights.notes,
    }
    return model.float().eval(), info
