"""The VISSL trunk: `MODEL.TRUNK.NAME: convit_ssl`, configured by `MODEL.TRUNK.CONVIT_SSL`.

VISSL already registers a trunk named `convit` (class `ConViT`), so ours is
registered as `convit_ssl` with class name `ConViTSSLTrunk`. The trunk *is*
the pure-PyTorch ConViT (features only, no classifier), so its state-dict keys
are timm's ConViT keys; VISSL heads do the classification.

Config block (upper case, each key optional except ARCH; null = the arch default):

    MODEL.TRUNK.CONVIT_SSL:
      ARCH: convit_tiny            # see convit_ssl.models.list_models()
      IMAGE_SIZE: 224              # int or [height, width]: the position-embedding grid
      PATCH_SIZE: 16
      IN_CHANS: 3
      WIDTH: null                  # total width; or HEAD_DIM (channels per head)
      HEAD_DIM: null
      DEPTH: null
      NUM_HEADS: null
      NUM_GPSA_LAYERS: null
      MLP_RATIO: null
      QKV_BIAS: null
      POS_DROP_RATE: null
      PROJ_DROP_RATE: null
      ATTN_DROP_RATE: null
      DROP_PATH_RATE: null
      LOCALITY_STRENGTH: null
      USE_POS_EMBED: null
      NORM_EPS: null

VISSL's `MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING: true`
switches on activation checkpointing of every block (`set_grad_checkpointing`);
NUM_ACTIVATION_CHECKPOINTING_SPLITS does not apply (the unit is one block).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from convit_ssl.models import ConViT, model_kwargs
from convit_ssl.models.geometry import patch_grid

TRUNK_NAME = "convit_ssl"
CONFIG_BLOCK = "CONVIT_SSL"

# config key -> (create_model argument, accepted types)
_NUMBER = (int, float)
CONFIG_KEYS: dict[str, tuple] = {
    "IMAGE_SIZE": ("img_size", (int, list, tuple)),
    "PATCH_SIZE": ("patch_size", (int,)),
    "IN_CHANS": ("in_chans", (int,)),
    "WIDTH": ("width", (int,)),
    "HEAD_DIM": ("head_dim", (int,)),
    "DEPTH": ("depth", (int,)),
    "NUM_HEADS": ("num_heads", (int,)),
    "NUM_GPSA_LAYERS": ("num_gpsa_layers", (int,)),
    "MLP_RATIO": ("mlp_ratio", _NUMBER),
    "QKV_BIAS": ("qkv_bias", (bool,)),
    "POS_DROP_RATE": ("pos_drop_rate", _NUMBER),
    "PROJ_DROP_RATE": ("proj_drop_rate", _NUMBER),
    "ATTN_DROP_RATE": ("attn_drop_rate", _NUMBER),
    "DROP_PATH_RATE": ("drop_path_rate", _NUMBER),
    "LOCALITY_STRENGTH": ("locality_strength", _NUMBER),
    "USE_POS_EMBED": ("use_pos_embed", (bool,)),
    "NORM_EPS": ("norm_eps", _NUMBER),
}


def trunk_kwargs(block: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map a `MODEL.TRUNK.CONVIT_SSL` block to `ConViT` keyword arguments.

    Raises ValueError naming an unknown key or a value of the wrong type, and
    KeyError for an unknown ARCH; the model's own checks (width divisible by
    heads, image size divisible by patch size, ...) run in `validate_trunk_config`.
    """
    where = f"MODEL.TRUNK.{CONFIG_BLOCK}"
    if not block:
        raise ValueError(f"{where} is missing: set at least {where}.ARCH (one of the convit_ssl architectures)")
    block = dict(block)
    unknown = sorted(set(block) - set(CONFIG_KEYS) - {"ARCH"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: ARCH, {', '.join(CONFIG_KEYS)}")
    arch = block.get("ARCH")
    if not arch:
        raise ValueError(f"{where}.ARCH is not set")
    overrides: dict[str, Any] = {"num_classes": 0}
    for key, value in block.items():
        if key == "ARCH" or value is None:
            continue
        name, types = CONFIG_KEYS[key]
        bad_bool = isinstance(value, bool) and bool not in types
        if not isinstance(value, types) or bad_bool:
            raise ValueError(
                f"{where}.{key} = {value!r} has type {type(value).__name__}; expected {_type_names(types)}"
            )
        if name == "img_size" and isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise ValueError(f"{where}.IMAGE_SIZE = {value!r}; expected an int or [height, width]")
            value = tuple(value)
        overrides[name] = value
    try:
        return model_kwargs(arch, **overrides)
    except KeyError as e:
        raise KeyError(f"{where}.ARCH: {e.args[0]}") from e
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _type_names(types: tuple) -> str:
    """(int, list, tuple) -> "int or [h, w]"."""
    names = {"list": "[h, w]", "tuple": "[h, w]"}
    return " or ".join(dict.fromkeys(names.get(t.__name__, t.__name__) for t in types))


def validate_trunk_config(model_config: Mapping[str, Any]) -> ConViT:
    """Build the trunk on the meta device to run every config check without
    allocating weights; raises ValueError/KeyError naming the problem."""
    kwargs = trunk_kwargs(model_config["TRUNK"].get(CONFIG_BLOCK))
    try:
        with torch.device("meta"):
            return ConViT(**kwargs)
    except ValueError as e:
        raise ValueError(f"MODEL.TRUNK.{CONFIG_BLOCK}: {e}") from e


# ---------------------------------------------------------------- VISSL's named features
FEATURE_NAMES_HELP = "lastCLS, blkCLS{i}, concatCLS{n}, lastPOOL, blkPOOL{i}, concatPOOL{n}, lastBLK, lastMAP"
_FEATURE_RE = re.compile(r"^(lastCLS|lastPOOL|lastBLK|lastMAP|blkCLS\d+|blkPOOL\d+|concatCLS\d+|concatPOOL\d+)$")


def parse_feature_names(names: Sequence[str], depth: int) -> dict[str, tuple[str, list[int]]]:
    """Validate feature names for a trunk of `depth` blocks; map each to (kind,
    block indices), kind in CLS / POOL / BLK / MAP. ValueError names a bad one."""
    if not names:
        raise ValueError(f"no feature names given; valid names: {FEATURE_NAMES_HELP}")
    parsed: dict[str, tuple[str, list[int]]] = {}
    last = depth - 1
    for name in names:
        if not isinstance(name, str) or not _FEATURE_RE.match(name):
            raise ValueError(f"unknown feature name {name!r}; valid names: {FEATURE_NAMES_HELP}")
        kind = re.sub(r"^(last|blk|concat)|\d+$", "", name)
        number = int(re.sub(r"^\D+", "", name) or -1)
        if name.startswith("last"):
            blocks = [last]
        elif name.startswith("blk"):
            if not 0 <= number <= last:
                raise ValueError(f"feature {name!r}: block index must be in 0..{last}")
            blocks = [number]
        else:
            if not 1 <= number <= depth:
                raise ValueError(f"feature {name!r}: the number of blocks must be in 1..{depth}")
            blocks = list(range(depth - number, depth))
        parsed[name] = (kind, blocks)
    return parsed


def named_features(model: ConViT, x: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    """VISSL's named features of images (B, C, H, W), in the order of `names`, from
    one `forward_intermediates` (after the final norm; blocks after the last one
    asked for do not run):

    - ``lastCLS`` (B, width): class token of the last block.
    - ``blkCLS{i}`` (B, width): class token after block i. Blocks before the
      class token joins (GPSA blocks) have none; their "CLS" is the mean of
      their patch tokens, the global summary they carry.
    - ``concatCLS{n}`` (B, n * width): blkCLS of the last n blocks, concatenated.
    - ``lastPOOL`` / ``blkPOOL{i}`` (B, width): mean of the patch tokens.
    - ``concatPOOL{n}`` (B, n * width): blkPOOL of the last n blocks, concatenated.
    - ``lastBLK`` (B, 1 + N, width): all tokens of the last block, class token first.
    - ``lastMAP`` (B, width, H, W): patch tokens of the last block as a feature map.
    """
    parsed = parse_feature_names(names, model.depth)
    wanted = sorted({b for _, blocks in parsed.values() for b in blocks})
    outputs = model.forward_intermediates(
        x, wanted, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
    )
    taken = dict(zip(wanted, outputs, strict=True))  # block -> (patch tokens (B, N, C), prefix (B, 0 or 1, C))

    def cls(i: int) -> torch.Tensor:
        patches, prefix = taken[i]
        return prefix[:, 0] if prefix.shape[1] else patches.mean(dim=1)

    out = []
    for name in names:
        kind, blocks = parsed[name]
        if kind == "CLS":
            out.append(torch.cat([cls(i) for i in blocks], dim=-1))
        elif kind == "POOL":
            out.append(torch.cat([taken[i][0].mean(dim=1) for i in blocks], dim=-1))
        elif kind == "BLK":
            out.append(torch.cat(taken[blocks[0]][::-1], dim=1))
        else:  # MAP
            patches = taken[blocks[0]][0]
            grid = patch_grid((x.shape[-2], x.shape[-1]), model.patch_size)
            out.append(patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid))
    return out


class ConViTSSLTrunk(ConViT):
    """ConViT as a VISSL trunk: `forward(x, out_feat_keys) -> List[Tensor]`.

    Without feature names it returns ``[lastCLS]`` (B, width); with names it
    returns those features in order (`named_features`).
    """

    def __init__(self, model_config: Mapping[str, Any], model_name: str) -> None:
        kwargs = trunk_kwargs(model_config["TRUNK"].get(CONFIG_BLOCK))
        try:
            super().__init__(**kwargs)
        except ValueError as e:
            raise ValueError(f"MODEL.TRUNK.{CONFIG_BLOCK}: {e}") from e
        self.model_name = model_name
        checkpointing = model_config.get("ACTIVATION_CHECKPOINTING") or {}
        self.set_grad_checkpointing(bool(checkpointing.get("USE_ACTIVATION_CHECKPOINTING", False)))

    def forward(self, x: torch.Tensor, out_feat_keys: list[str] | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        if not out_feat_keys:
            return [self.forward_features(x)[:, 0]]
        return named_features(self, x, out_feat_keys)


def register() -> None:
    """Register the trunk with VISSL (idempotent)."""
    # patch order: upstream.py (imported by patches.py before it patches) imports this module
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY, register_model_trunk

    if MODEL_TRUNKS_REGISTRY.get(TRUNK_NAME) is ConViTSSLTrunk:
        return
    register_model_trunk(TRUNK_NAME)(ConViTSSLTrunk)


def find_convit(model: torch.nn.Module, who: str) -> ConViT:
    """The one ConViT inside a VISSL model (a DDP wrapper removed; also when
    wrapped for feature evaluation); `who` (the hook or option) names the error."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    found = [m for m in model.modules() if isinstance(m, ConViT)]
    if len(found) != 1:
        what = "no convit_ssl ConViT" if not found else f"{len(found)} convit_ssl ConViTs"
        raise ValueError(
            f"{who}: {what} in the model ({type(model).__name__}); it needs exactly one, MODEL.TRUNK.NAME={TRUNK_NAME}"
        )
    return found[0]
