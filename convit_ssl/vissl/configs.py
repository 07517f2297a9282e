"""Finding and composing convit_ssl's VISSL configs.

VISSL's Hydra plugin searches `file://configs` (relative to the current
directory) and `pkg://configs` (VISSL's own tree). convit_ssl adds its own
tree to the search path explicitly, so `config=NAME` works from any working
directory, from a source checkout (repo/configs) or a regular install
(site-packages/convit_ssl/configs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from vissl.utils.hydra_config import convert_to_attrdict

from convit_ssl.config_root import config_root


def compose(overrides: Sequence[str]) -> tuple[Any, Any]:
    """Compose VISSL's defaults with `overrides` (e.g. ``config=NAME``, ``config.X=Y``)
    and return VISSL's (args, config) AttrDicts, without writing anything."""

    overrides = list(overrides)
    if not any(o.split("=", 1)[0] == "config" for o in overrides):
        raise ValueError(
            "no config given: pass config=NAME (for example config=test/convit_ssl/supervised_micro_synthetic)"
        )
    searchpath = f"hydra.searchpath=[file://{config_root()}]"
    with initialize_config_module(config_module="vissl.config", version_base="1.3"):
        cfg = hydra_compose("defaults", overrides=[searchpath, *overrides])
    return convert_to_attrdict(cfg, dump_config=False)


def num_epochs(overrides: Sequence[str]) -> int:
    """OPTIMIZER.num_epochs of the config `overrides` compose."""
    return int(compose(overrides)[1].OPTIMIZER.num_epochs)


def used_splits(config: Any) -> list[str]:
    """The data splits a run reads: TRAIN unless TEST_ONLY; TEST if TEST_MODEL or TEST_ONLY."""
    splits = [] if config.TEST_ONLY else ["TRAIN"]
    if config.TEST_MODEL or config.TEST_ONLY:
        splits.append("TEST")
    return splits


# VISSL's self-supervised methods -> their folder under configs/config/pretrain
SSL_METHODS = {
    "dino": "dino",
    "moco": "moco",
    "swav": "swav",
    "simclr": "simclr",
    "barlow_twins": "barlow_twins",
    "deepclusterv2": "deepcluster_v2",
}


def small_scale_config(method: str) -> str:
    """The shipped small-scale config of a self-supervised method (the demo-size ConViT on the digits)."""
    if method not in SSL_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(SSL_METHODS)}")
    return f"pretrain/{SSL_METHODS[method]}/{method}_convit_demo_digits_32"
