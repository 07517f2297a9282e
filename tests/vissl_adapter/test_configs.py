"""Every shipped config composes (and its trunk block validates); configs are
found after a regular install from any working directory; our config names
never shadow VISSL's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convit_ssl.vissl.configs import compose, config_root
from convit_ssl.vissl.model.trunk import TRUNK_NAME, parse_feature_names, validate_trunk_config
from helpers import REPO

CONFIG_DIR = REPO / "configs" / "config"
SHIPPED = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def test_there_are_configs():
    assert "test/convit_ssl/supervised_micro_synthetic" in SHIPPED
    assert config_root() == REPO / "configs"


@pytest.mark.parametrize("name", SHIPPED)
def test_config_composes(name):
    _, config = compose([f"config={name}"])
    if config.MODEL.TRUNK.NAME == TRUNK_NAME:
        model = validate_trunk_config(config.MODEL)
        feature_map = config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP
        if feature_map:
            parse_feature_names([item[0] for item in feature_map], model.depth)


def test_no_config_shadows_vissl():
    import importlib.resources

    vissl_configs = Path(str(importlib.resources.files("configs"))) / "config"
    assert vissl_configs.is_dir()
    clashes = [name for name in SHIPPED if (vissl_configs / f"{name}.yaml").exists()]
    assert clashes == []


def test_configs_found_after_regular_install(tmp_path):
    """A non-editable install carries the YAML as package data; composing works
    from an unrelated working directory."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    code = (
        "import convit_ssl, sys\n"
        "from convit_ssl.vissl.configs import compose, config_root\n"
        "assert convit_ssl.__file__.startswith(sys.argv[1]), convit_ssl.__file__\n"
        "assert str(config_root()).startswith(sys.argv[1]), config_root()\n"
        "_, c = compose(['config=test/convit_ssl/supervised_micro_synthetic'])\n"
        "print(c.MODEL.TRUNK.NAME)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(TRUNK_NAME)
