"""Config-driven checkpoint conversion (`tools/convert_checkpoint.py`, `convit-ssl convert`).

    python tools/convert_checkpoint.py config=timm_to_vissl input=convit_small.pth output=convit_small.torch

`config` names a YAML file in configs/convert/ (or is a path to one); any
field can be overridden as key=value. Steps: load safely (a file, a timm hub
folder, or a VISSL run folder), name the source format (declared, or
detected when `source_format: auto`; a declared format that the file
contradicts is an error), read into canonical form, resample to a new image
or patch size if asked, write the target format, verify it (strict load into
the target implementation and the same random batch through source and
target), and save atomically. A timm or vit target whose `output` ends in
`/` is written as a hub folder, verified by `timm.create_model("local-dir:...")`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from convit_ssl.checkpoints import hub
from convit_ssl.checkpoints.formats import (FORMATS, NETWORKS, Weights, detect_format, read, select_network,
                                           unwrap_state_dict, write)
from convit_ssl.checkpoints.infer import build_convit, check_trunk, infer_model_kwargs, strict_load
from convit_ssl.checkpoints.io import CheckpointError, save_checkpoint
from convit_ssl.checkpoints.loader import architecture_hint, default_norm_eps, read_source
from convit_ssl.checkpoints.vissl_convit import VISSL_CONVIT_NORM_EPS
from convit_ssl.models import ConViT
from convit_ssl.models.geometry import patch_grid, to_pair

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertConfig:
    """Fields of a conversion config (configs/convert/*.yaml)."""

    input: Optional[str] = None
    output: Optional[str] = None
    source_format: str = "auto"          # auto | vissl | timm | vissl_convit | vit
    target_format: Optional[str] = None  # vissl | timm | vissl_convit | vit
    arch: Optional[str] = None           # null: read the architecture from tensor shapes (or a hub config.json)
    num_heads: Optional[int] = None      # heads of a ViT/DeiT (not visible in its shapes); null: from arch or config.json
    network: str = "student"             # VISSL DINO / MoCo checkpoints: student | teacher (the momentum teacher)
    keep_head: bool = True               # carry the classifier over (VISSL mlp/eval_mlp <-> timm head)
    head_index: int = 0                  # which VISSL head becomes timm's head
    bn_eps: float = 1e-5                 # eps of an eval_mlp head's BatchNorm (VISSL's HEAD.BATCHNORM_EPS)
    norm_eps: Optional[float] = None     # LayerNorm eps of the weights (null: 1e-6, or 1e-5 for vissl_convit)
    image_size: Optional[Any] = None     # int or [h, w]: resample the position embedding to this size
    patch_size: Optional[int] = None     # new patch size: FlexiViT pseudo-inverse resize of the patch kernel
    dtype: Optional[str] = None          # null keeps the checkpoint's dtype; float32 | float16 | bfloat16
    verify: bool = True                  # compare source and target outputs on a random batch
    verify_batch: int = 2
    verify_tolerance: float = 1e-4       # max |source - target| (fp32) accepted
    overwrite: bool = False
    seed: int = 0
    # preprocessing recorded in a hub folder's pretrained_cfg (null: the source hub folder's, else ImageNet's)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None


def _check(cfg: ConvertConfig) -> None:
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


# ---------------------------------------------------------------- models
def _timm_model(state: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> nn.Module:
    try:
        from timm.models.convit import ConVit
    except ImportError as e:
        raise RuntimeError("verifying timm output needs timm installed (pip install timm), or verify=false") from e
    heads = kwargs["num_heads"]
    model = ConVit(
        img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_chans=kwargs["in_chans"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        embed_dim=kwargs["width"] // heads, depth=kwargs["depth"], num_heads=heads,
        mlp_ratio=kwargs["mlp_ratio"], qkv_bias=kwargs["qkv_bias"], local_up_to_layer=kwargs["num_gpsa_layers"],
        use_pos_embed=kwargs["use_pos_embed"], norm_layer=partial(nn.LayerNorm, eps=kwargs["norm_eps"]),
    )
    strict_load(model, state)
    return model.eval()


def _vit_model(state: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise RuntimeError("verifying vit weights needs timm installed (pip install timm), or verify=false") from e
    from convit_ssl.checkpoints.vit import class_slot

    model = VisionTransformer(
        img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_chans=kwargs["in_chans"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, global_pool="token",
        embed_dim=kwargs["width"], depth=kwargs["depth"], num_heads=kwargs["num_heads"], mlp_ratio=kwargs["mlp_ratio"],
        qkv_bias=kwargs["qkv_bias"], class_token=True, norm_layer=partial(nn.LayerNorm, eps=kwargs["norm_eps"]),
        no_embed_class=not class_slot(state["pos_embed"]),  # DeiT III: no class slot
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,  # DeiT III: layer scale
    )
    strict_load(model, state)
    return model.eval()


def _source_forward(obj: Any, fmt: str, weights: Weights, kwargs: Dict[str, Any], head_index: int = 0,
                    bn_eps: float = 1e-5):
    """The checkpoint run by its own implementation: timm's ConVit for timm files;
    for VISSL files, the trunk (VISSL's built-in one for vissl_convit, ours for
    vissl) followed by VISSL's own head module as stored (not our fold of it)."""
    if fmt == "timm":
        return _timm_model(write(Weights(weights.trunk, weights.head), "timm"), kwargs)
    if fmt == "vit":  # the file's own tensors (class slot and layer scale unfolded)
        state = {k.removeprefix("module."): v for k, v in unwrap_state_dict(obj)[0].items()}
        if weights.head is None:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        return _vit_model(state, kwargs)
    if fmt == "vissl_convit":
        from convit_ssl.vissl.builtin_convit import build_vissl_convit

        trunk = build_vissl_convit(obj, kwargs)
    else:
        trunk = build_convit(weights.trunk, kwargs)
    if weights.head is None:
        return trunk
    from convit_ssl.checkpoints.formats import vissl_model_parts
    from convit_ssl.vissl.heads import build_vissl_head

    head = build_vissl_head(vissl_model_parts(obj)[1], head_index, bn_eps)
    return lambda x: head(trunk(x))


def _target_forward(out: Dict[str, Any], fmt: str, kwargs: Dict[str, Any]) -> nn.Module:
    """Load the converted object strictly into the target implementation."""
    if fmt == "timm":
        return _timm_model(out, kwargs)
    if fmt == "vit":
        return _vit_model(out, kwargs)
    back = read(out, fmt)
    return _source_forward(out, fmt, back, kwargs)


# ---------------------------------------------------------------- convert
def convert(cfg: ConvertConfig, log=print) -> Dict[str, Any]:
    """Run one conversion; return a report (formats, model, notes, max difference, seconds)."""
    _check(cfg)
    start = time.perf_counter()
    folder_output = cfg.output.endswith("/")
    if folder_output and cfg.target_format not in ("timm", "vit"):
        raise ValueError(f"output {cfg.output!r} ends in '/' (a hub folder), which only timm and vit targets write")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output!r} exists; pass overwrite=true to replace it")
    read_in = read_source(cfg.input)
    obj = select_network(read_in.obj, cfg.network)
    if cfg.dtype is not None:  # cast first: verification then compares implementations on the same weights
        obj = _cast(obj, DTYPES[cfg.dtype])
    detected = detect_format(obj)
    if cfg.source_format not in ("auto", detected):
        raise CheckpointError(f"{cfg.input!r} was declared {cfg.source_format} but holds a {detected} checkpoint "
                              f"(give source_format={detected} or auto)")
    fmt = detected
    arch, num_heads = architecture_hint(fmt, read_in.hub_config, cfg.arch, cfg.num_heads, cfg.input)
    weights = read(obj, fmt, keep_head=cfg.keep_head, head_index=cfg.head_index, bn_eps=cfg.bn_eps)
    weights.notes[:0] = read_in.notes + (["the momentum teacher (network=teacher)"] if cfg.network == "teacher" else [])
    kwargs = infer_model_kwargs(weights.trunk, arch, num_heads)
    check_trunk(weights.trunk, kwargs)
    if cfg.dtype is not None:
        weights.notes.append(f"cast to {cfg.dtype} (verification runs both implementations on the cast weights)")
    kwargs["norm_eps"] = default_norm_eps(fmt) if cfg.norm_eps is None else cfg.norm_eps
    if fmt == "vissl_convit":
        weights.notes.append(f"LayerNorm eps {kwargs['norm_eps']} (VISSL's built-in convit uses 1e-5): "
                             "build the target model with norm_eps to match")
    source_kwargs = dict(kwargs)
    if cfg.verify:
        reference = build_convit(weights.trunk, source_kwargs, weights.head)
        # A headless vissl file runs on our trunk alone: that is the reference itself.
        source = (reference if fmt == "vissl" and weights.head is None
                  else _source_forward(obj, fmt, weights, source_kwargs, cfg.head_index, cfg.bn_eps))

    if cfg.target_format == "vissl_convit" and kwargs["norm_eps"] != VISSL_CONVIT_NORM_EPS:
        weights.notes.append(
            f"VISSL's built-in trunk has LayerNorm eps {VISSL_CONVIT_NORM_EPS}, these weights {kwargs['norm_eps']}: "
            "it computes a slightly different function; verified against convit_ssl at its eps")
        if cfg.verify:
            source = reference = build_convit(weights.trunk, {**kwargs, "norm_eps": VISSL_CONVIT_NORM_EPS}, weights.head)
        kwargs["norm_eps"] = VISSL_CONVIT_NORM_EPS
    if folder_output and kwargs["norm_eps"] != 1e-6:
        raise CheckpointError(f"these weights have LayerNorm eps {kwargs['norm_eps']}; timm's ConVit and ViT use 1e-6 "
                              "and a hub folder cannot record another: write a single timm file (output without '/')")
    weights = _resample(weights, kwargs, cfg)
    out = write(weights, cfg.target_format)

    report: Dict[str, Any] = {"source_format": fmt, "target_format": cfg.target_format,
                              "model": {k: v for k, v in kwargs.items() if k != "num_classes"},
                              "head_classes": None if weights.head is None else int(weights.head["weight"].shape[0]),
                              "notes": weights.notes}
    if folder_output:
        _save_hub_folder(out, kwargs, cfg, read_in.hub_config, report, (source, reference, source_kwargs) if cfg.verify else None)
    else:
        if cfg.verify:
            report["max_abs_diff"] = _verify(source, reference, source_kwargs, out, kwargs, cfg, report)
        save_checkpoint(out, cfg.output, overwrite=cfg.overwrite)
    report["seconds"] = round(time.perf_counter() - start, 3)
    log(_format_report(cfg, report))
    return report


def _save_hub_folder(out: Dict[str, torch.Tensor], kwargs: Dict[str, Any], cfg: ConvertConfig,
                     source_config: Optional[Dict[str, Any]], report: Dict[str, Any], verify) -> None:
    """Write `out` as a hub folder at cfg.output, staged beside it; verified (when
    asked) by timm.create_model("local-dir:...") before it takes the final name."""
    num_classes = int(out["head.weight"].shape[0]) if "head.weight" in out else 0
    preprocessing = {**hub.preprocessing_of(source_config),
                     **{k: getattr(cfg, k) for k in ("mean", "std", "interpolation", "crop_pct")
                        if getattr(cfg, k) is not None}}
    make = hub.vit_hub_config if cfg.target_format == "vit" else hub.convit_hub_config
    config = make(kwargs, num_classes, preprocessing)
    with hub.staged_folder(cfg.output.rstrip("/"), cfg.overwrite) as staging:
        hub.write_hub_folder(staging, out, config)
        if verify is not None:
            source, reference, source_kwargs = verify
            report["max_abs_diff"] = _verify(source, reference, source_kwargs, out, kwargs, cfg, report,
                                             target=hub.load_with_timm(staging))
            report["verification"] += ' (the folder loaded by timm.create_model("local-dir:..."))'


def _cast(node: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors of a nested checkpoint cast to `dtype`."""
    if isinstance(node, torch.Tensor):
        return node.to(dtype) if node.is_floating_point() else node
    if isinstance(node, dict):
        return {k: _cast(v, dtype) for k, v in node.items()}
    return node


def _resample(weights: Weights, kwargs: Dict[str, Any], cfg: ConvertConfig) -> Weights:
    from convit_ssl.checkpoints.resample import resample_state_dict, resize_patch_embed_state_dict

    trunk = weights.trunk
    notes = list(weights.notes)
    old_patch = kwargs["patch_size"]
    old_grid = patch_grid(kwargs["img_size"], old_patch)
    if cfg.patch_size is not None and cfg.patch_size != old_patch:
        trunk = resize_patch_embed_state_dict(trunk, cfg.patch_size)
        kwargs["patch_size"] = cfg.patch_size
        notes.append(f"patch size {old_patch} -> {cfg.patch_size} (FlexiViT pseudo-inverse resize of the patch kernel)")
    image_size = cfg.image_size if cfg.image_size is not None else None
    if image_size is None and cfg.patch_size is not None:
        image_size = [g * kwargs["patch_size"] for g in old_grid]  # same grid
    if image_size is not None:
        new_grid = patch_grid(image_size, kwargs["patch_size"])
        if new_grid[0] != new_grid[1] and cfg.target_format != "vissl":
            raise CheckpointError(f"image_size {image_size} gives a {new_grid[0]}x{new_grid[1]} patch grid: "
                                  f"{cfg.target_format} ConViTs take square grids only (convit_ssl's vissl format "
                                  "takes any)")
        if new_grid != old_grid and kwargs["use_pos_embed"]:
            trunk = resample_state_dict(trunk, new_grid, old_grid)
            notes.append(f"position embedding resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} (bicubic)")
        kwargs["img_size"] = tuple(g * kwargs["patch_size"] for g in new_grid)
    return Weights(trunk, weights.head, notes)


@torch.no_grad()
def _verify(source, reference: ConViT, source_kwargs, out, kwargs, cfg: ConvertConfig, report: Dict[str, Any],
            target: Optional[nn.Module] = None) -> float:
    """Random batches through the source implementation, the target implementation
    (strict load of the converted object) and convit_ssl on the unconverted weights.

    Without resampling, source and target are compared directly. With a new image
    size, the target is compared with convit_ssl resampling the original position
    embedding at forward time (timm and VISSL's trunk run at one size only). With a
    new patch size the function changes by design: the target must load and be finite."""
    target = _target_forward(out, cfg.target_format, kwargs) if target is None else target
    generator = torch.Generator().manual_seed(cfg.seed)
    x_src = torch.randn(cfg.verify_batch, source_kwargs["in_chans"], *to_pair(source_kwargs["img_size"]), generator=generator)
    x_tgt = torch.randn(cfg.verify_batch, kwargs["in_chans"], *to_pair(kwargs["img_size"]), generator=generator)
    diffs: Dict[str, float] = {}
    y_source = source(x_src).float()
    if source is not reference:
        diffs["source vs convit_ssl"] = (y_source - reference(x_src).float()).abs().max().item()
    if kwargs["patch_size"] != source_kwargs["patch_size"]:
        if not torch.isfinite(target(x_tgt)).all():
            raise CheckpointError("verification failed: the converted model gives non-finite outputs")
        report["verification"] = "strict load into the target; outputs not compared (the patch size changed)"
    elif to_pair(kwargs["img_size"]) == to_pair(source_kwargs["img_size"]):
        diffs["source vs target"] = (y_source - target(x_src).float()).abs().max().item()
    else:
        diffs["target vs convit_ssl resampling at forward time"] = (
            target(x_tgt).float() - reference(x_tgt).float()).abs().max().item()
    report.setdefault("verification", "strict load into the target; " + ", ".join(
        f"max |{name}| = {value:.3g}" for name, value in diffs.items()))
    worst = max(diffs.values(), default=0.0)
    if worst > cfg.verify_tolerance:
        raise CheckpointError(f"verification failed: {report['verification']} > tolerance {cfg.verify_tolerance}")
    return worst


def _format_report(cfg: ConvertConfig, report: Dict[str, Any]) -> str:
    model = report["model"]
    lines = [
        f"converted {cfg.input} ({report['source_format']}) -> {cfg.output} ({report['target_format']})",
        "  model: " + ", ".join(f"{k}={v}" for k, v in model.items()),
        f"  head: {report['head_classes']} classes" if report["head_classes"] else "  head: none",
    ]
    lines += [f"  note: {note}" for note in report["notes"]]
    lines.append(f"  verification: {report.get('verification', 'skipped (verify=false)')}")
    lines.append(f"  {report['seconds']} s")
    return "\n".join(lines)


def load_config(overrides: Sequence[str]) -> ConvertConfig:
    """`config=NAME` (configs/convert/NAME.yaml, or a YAML path) plus key=value overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from convit_ssl.config_root import config_root

    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"argument {item!r} is not key=value")
        pairs.append(item.split("=", 1))
    names = [v for k, v in pairs if k == "config"]
    if len(names) != 1:
        raise ValueError("give exactly one config=NAME (a file in configs/convert/ or a YAML path)")
    folder = config_root() / "convert"
    path = Path(names[0]) if names[0].endswith((".yaml", ".yml")) else folder / f"{names[0]}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"conversion config {names[0]!r} not found ({path}); available: {', '.join(available)}")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ConvertConfig), OmegaConf.load(path),
            OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs if k != "config"]),
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        fields = ", ".join(ConvertConfig.__dataclass_fields__)
        raise ValueError(f"bad conversion config ({path.name} + overrides): {str(e).splitlines()[0]}; "
                         f"fields: {fields}") from e


def main(argv: Sequence[str]) -> Dict[str, Any]:
    """Entry point of tools/convert_checkpoint.py and `convit-ssl convert`."""
    return convert(load_config(argv))
