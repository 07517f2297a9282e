"""timm / Hugging Face hub folders: `config.json` beside `model.safetensors`
(or `pytorch_model.bin`), as `timm.models.save_for_hf` writes them and the hub
cache holds them (models--timm--convit_small.fb_in1k/snapshots/<hash>/).

Reading gives the state dict and the folder's config; writing produces a
folder that `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds
with no other argument: `architecture` names a registered timm model and
`model_args` carry every dimension, so tiny or non-default models come back
exactly; `pretrained_cfg` holds the preprocessing (input size, mean, std,
interpolation, crop) and the number of classes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# optional dependency: timm, only to check a hub folder against it
from convit_ssl.checkpoints.io import CheckpointError, load_checkpoint
from convit_ssl.checkpoints.vit import timm_vit_name
from convit_ssl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from convit_ssl.files import PathLike
from convit_ssl.models.factory import ARCHITECTURES

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# timm's ConViT names (timm has no "+" variants) and their (channels per head, heads)
TIMM_CONVITS = {
    name: (ARCHITECTURES[name]["width"] // ARCHITECTURES[name]["num_heads"], ARCHITECTURES[name]["num_heads"])
    for name in ("convit_tiny", "convit_small", "convit_base")
}


def is_hub_folder(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_hub_folder(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(state dict, config.json, name of the weights file) of a timm hub folder."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(path / CONFIG_FILE)!r} is not a readable JSON file: {e}") from e
    if not isinstance(config, dict) or "architecture" not in config:
        raise CheckpointError(f"{str(path / CONFIG_FILE)!r} is not a timm model config (no 'architecture' field)")
    for name in WEIGHT_FILES:
        file = path / name
        if file.is_file():
            return load_checkpoint(file), config, name
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"hub folder {str(path)!r} has a config.json but no weights: expected one of "
        f"{', '.join(WEIGHT_FILES)}; found {present}"
    )


def convit_hub_config(kwargs: Mapping[str, Any], num_classes: int, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of a ConViT (timm's `ConVit`) with the dimensions `kwargs` (ConViT keyword arguments)."""
    heads = kwargs["num_heads"]
    head_dim = kwargs["width"] // heads
    architecture = next((name for name, dims in TIMM_CONVITS.items() if dims == (head_dim, heads)), "convit_tiny")
    model_args = {
        **_model_args(kwargs, num_classes),
        "embed_dim": head_dim,  # timm's ConVit: per head
        "local_up_to_layer": kwargs["num_gpsa_layers"],
        "use_pos_embed": kwargs["use_pos_embed"],
    }
    return _hub_config(architecture, model_args, kwargs, num_classes, preprocessing)


def vit_hub_config(kwargs: Mapping[str, Any], num_classes: int, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of a DeiT baseline as timm's `VisionTransformer`."""
    architecture = timm_vit_name(kwargs["width"], kwargs["num_heads"])
    model_args = {**_model_args(kwargs, num_classes), "embed_dim": kwargs["width"], "class_token": True}
    return _hub_config(architecture, model_args, kwargs, num_classes, preprocessing)


def _model_args(kwargs: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The timm model arguments both ConVit and VisionTransformer take alike."""
    return {
        "img_size": list(_pair(kwargs["img_size"])),
        "patch_size": kwargs["patch_size"],
        "in_chans": kwargs["in_chans"],
        "num_classes": num_classes,
        "depth": kwargs["depth"],
        "num_heads": kwargs["num_heads"],
        "mlp_ratio": kwargs["mlp_ratio"],
        "qkv_bias": kwargs["qkv_bias"],
        "global_pool": "token",
    }


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _hub_config(
    architecture: str,
    model_args: dict[str, Any],
    kwargs: Mapping[str, Any],
    num_classes: int,
    preprocessing: Mapping[str, Any],
) -> dict[str, Any]:
    pretrained_cfg = {
        "custom_load": False,
        "input_size": [kwargs["in_chans"], *_pair(kwargs["img_size"])],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    pretrained_cfg.update({k: v for k, v in preprocessing.items() if v is not None})
    pretrained_cfg["num_classes"] = num_classes
    return {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": kwargs["width"],
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


@contextmanager
def staged_folder(path: PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed to `path` when the block succeeds
    (an existing folder replaced only with `overwrite`); removed on failure."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=true to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the folder is meant to be shared
    try:
        yield staging
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_hub_folder(folder: Path, state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """model.safetensors and config.json into an existing (staging) folder."""
    try:
        # optional dependency: safetensors, only for writing a hub folder
        from safetensors.torch import save_file
    except ImportError as e:
        raise CheckpointError("writing a hub folder needs the safetensors package (pip install safetensors)") from e
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"}
    )
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_with_timm(folder: Path) -> torch.nn.Module:
    """`timm.create_model("local-dir:FOLDER", pretrained=True)` in eval mode."""
    try:
        # optional dependency: timm, only to check a hub folder against it
        import timm
    except ImportError as e:
        raise RuntimeError("verifying a hub folder needs timm installed (pip install timm), or verify=false") from e
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def preprocessing_of(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preprocessing fields of a source hub folder's pretrained_cfg, to carry over."""
    if not config:
        return {}
    cfg = config.get("pretrained_cfg") or {}
    keep = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "license", "tag")
    return {k: cfg[k] for k in keep if k in cfg}
