"""`convit-ssl convert` and tools/convert_checkpoint.py: a conversion config read from YAML.

    python tools/convert_checkpoint.py config=timm_to_vissl input=convit_small.pth output=convit_small.torch

`config` names a YAML file in configs/convert/ (or is a path to one); any
field of `ConvertConfig` can be overridden as key=value. The conversion itself
is `convit_ssl.checkpoints.convert` (read, plan the target, write, verify,
save atomically). This command also verifies vissl_convit files in VISSL's
built-in convit trunk, which imports VISSL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from convit_ssl.checkpoints.convert import ConvertConfig, convert, format_report
from convit_ssl.config_root import config_root


def load_config(overrides: Sequence[str]) -> ConvertConfig:
    """`config=NAME` (configs/convert/NAME.yaml, or a YAML path) plus key=value overrides."""
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
            OmegaConf.structured(ConvertConfig),
            OmegaConf.load(path),
            OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs if k != "config"]),
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        fields = ", ".join(ConvertConfig.__dataclass_fields__)
        raise ValueError(
            f"bad conversion config ({path.name} + overrides): {str(e).splitlines()[0]}; fields: {fields}"
        ) from e


def _vissl_builtin_convit(checkpoint: Any, kwargs: dict[str, Any]):
    """VISSL's built-in convit trunk holding `checkpoint`: imports VISSL, so only when a
    vissl_convit file is verified."""
    # start-up: VISSL loads only for VISSL's built-in convit format
    from convit_ssl.vissl.model.builtin_convit import build_vissl_convit

    return build_vissl_convit(checkpoint, kwargs)


def run(cfg: ConvertConfig, log=print) -> dict[str, Any]:
    """`convert(cfg)` verifying vissl_convit files in VISSL's built-in trunk; the report printed through `log`."""
    report = convert(cfg, vissl_convit_trunk=_vissl_builtin_convit)
    log(format_report(cfg, report))
    return report


def main(argv: Sequence[str]) -> dict[str, Any]:
    """Entry point of tools/convert_checkpoint.py and `convit-ssl convert`."""
    return run(load_config(argv))
