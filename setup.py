"""convit_ssl: ConViT trunks for VISSL on today's Python / PyTorch stack.

VISSL 0.1.6 and ClassyVision 0.7.0 pin 2021 versions of their dependencies
that no longer install on Python 3.11; install them with --no-deps (see the
Makefile and README). This package installs only `convit_ssl` (with its YAML
configs as package data under convit_ssl/configs) and the `convit-ssl` command.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CONFIG_FILES = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".md"))

setup(
    name="convit_ssl",
    version="0.1.0",
    description="ConViT (gated positional self-attention) trunks for VISSL",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["convit_ssl", "convit_ssl.*"]) + ["convit_ssl.configs"],
    package_dir={"convit_ssl.configs": "configs"},
    package_data={"convit_ssl.configs": CONFIG_FILES},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy>=1.24",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "fvcore",
        "iopath",
        "scikit-learn",
        "tabulate",
        "submitit",
        "parameterized",
        "tensorboard",
        "pillow",
        "matplotlib>=3.7",
        "pyyaml",
        "termcolor",
        "yacs",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "timm>=1.0"]},
    entry_points={"console_scripts": ["convit-ssl = convit_ssl.cli:main"]},
)
