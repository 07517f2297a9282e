"""Load-time preparation of `MODEL.WEIGHTS_INIT.PARAMS_FILE`: the network to
load, and resampling.

`MODEL.WEIGHTS_INIT.NETWORK: teacher` (default `student`) loads the momentum
teacher that a DINO or MoCo run keeps in its checkpoint
(classy_state_dict.loss.momentum_teacher / moco_encoder) instead of the
student; DINO evaluates its teacher.

VISSL copies checkpoint tensors into the model only when shapes match, and its
own position-embedding interpolation fires only for names containing
`pos_embedding` (never ours, `pos_embed`). So before launching, convit_ssl
reads the weights file once; if its position embedding was trained on another
patch grid than the config's (MODEL.TRUNK.CONVIT_SSL IMAGE_SIZE / PATCH_SIZE),
or its patch kernel has another patch size, it writes a resampled copy in the run's
checkpoint folder (weights_init/) and points PARAMS_FILE at it, logging what it did. Any
layout works (VISSL checkpoint, feature-eval prefixes, bare trunk, timm keys):
every tensor named `pos_embed` / `*.pos_embed` and `*patch_embed.proj.weight`
is adapted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from convit_ssl.checkpoints.formats import NETWORKS, select_network
from convit_ssl.checkpoints.io import CheckpointError, atomic_torch_save, load_checkpoint
from convit_ssl.checkpoints.resample import resize_patch_embed
from convit_ssl.models import ConViT, resample_pos_embed
from convit_ssl.models.geometry import square_grid
from convit_ssl.vissl.model.trunk import CONFIG_BLOCK, TRUNK_NAME, trunk_kwargs

logger = logging.getLogger(__name__)


def _adapt(node: Any, grid: tuple[int, int], patch: int, path: str, changes: list[str]) -> Any:
    """A copy of nested dicts `node` with position embeddings and patch kernels adapted."""
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    for key, value in node.items():
        name = f"{path}.{key}" if path else str(key)
        last = str(key).rsplit(".", 1)[-1]
        if isinstance(value, torch.Tensor) and last == "pos_embed" and value.ndim == 3:
            tokens = value.shape[1]
            if tokens != grid[0] * grid[1]:
                try:
                    old = square_grid(tokens, name)
                except ValueError as e:
                    raise ValueError(
                        f"{e}: resample it with tools/convert_checkpoint.py (image_size=...) before fine-tuning"
                    ) from None
                value = resample_pos_embed(value, grid, old)
                changes.append(f"resampled {name}: {old[0]}x{old[1]} -> {grid[0]}x{grid[1]} patches")
        elif isinstance(value, torch.Tensor) and str(key).endswith("patch_embed.proj.weight") and value.ndim == 4:
            if value.shape[-1] != patch:
                changes.append(f"resampled {name}: patch {value.shape[-1]} -> {patch} (FlexiViT pseudo-inverse resize)")
                value = resize_patch_embed(value, patch)
        out[key] = _adapt(value, grid, patch, name, changes)
    return out


def prepare_weights_init(config: Any) -> str | None:
    """Select the network (MODEL.WEIGHTS_INIT.NETWORK) of
    config.MODEL.WEIGHTS_INIT.PARAMS_FILE and resample it for the configured
    grid if needed; returns the path of the prepared copy (and sets it in the
    config), or None when the file already fits or no file is set."""
    model = config.MODEL
    params_file = model.WEIGHTS_INIT.PARAMS_FILE
    network = model.WEIGHTS_INIT.get("NETWORK", "student")
    if network not in NETWORKS:
        raise ValueError(f"config.MODEL.WEIGHTS_INIT.NETWORK {network!r} is not one of {', '.join(NETWORKS)}")
    if model.TRUNK.NAME != TRUNK_NAME or not params_file:
        return None
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {params_file!r} does not exist")
    with torch.device("meta"):  # the trunk's own grid and patch size, its defaults included
        trunk = ConViT(**trunk_kwargs(model.TRUNK.get(CONFIG_BLOCK)))
    grid, patch = trunk.grid, trunk.patch_size
    changes: list[str] = []
    checkpoint = load_checkpoint(params_file)
    if network == "teacher":
        if model.WEIGHTS_INIT.get("STATE_DICT_KEY_NAME", "classy_state_dict") != "classy_state_dict":
            raise ValueError(
                "config.MODEL.WEIGHTS_INIT.NETWORK=teacher reads a VISSL checkpoint: "
                "STATE_DICT_KEY_NAME must be classy_state_dict"
            )
        try:
            checkpoint = select_network(checkpoint, "teacher")
        except CheckpointError as e:
            raise ValueError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {params_file!r}: {e}") from e
        changes.append("the momentum teacher (MODEL.WEIGHTS_INIT.NETWORK=teacher)")
    adapted = _adapt(checkpoint, grid, patch, "", changes)
    if not changes:
        return None
    # A sub-folder: VISSL treats any model_final_checkpoint* file in CHECKPOINT.DIR
    # (the source name may be one) as a finished run.
    folder = Path(config.CHECKPOINT.DIR) / "weights_init"
    folder.mkdir(parents=True, exist_ok=True)
    tag = "teacher_" if network == "teacher" else ""
    target = folder / f"{tag}{grid[0]}x{grid[1]}_p{patch}_{Path(params_file).name}"
    atomic_torch_save(adapted, target)
    for change in changes:
        logger.info("weights init: %s", change)
    print(
        f"convit_ssl: {params_file} prepared for a {trunk.img_size[0]}x{trunk.img_size[1]} input with {patch} px "
        f"patches ({'; '.join(changes)}) -> {target}",
        flush=True,
    )
    model.WEIGHTS_INIT.PARAMS_FILE = str(target)
    return str(target)
