"""`convit-ssl analyze` / `tools/analyze.py`: the paper's figures for any ConViT checkpoint.

    convit-ssl analyze CHECKPOINT --images FOLDER --out DIR [--log RUN/convit_analysis.jsonl]

The options; the work (and the list of files it writes) is
`convit_ssl.analysis.pipeline.run_analysis`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from convit_ssl.analysis.pipeline import DEFAULT_NUM_IMAGES, run_analysis
from convit_ssl.checkpoints.formats import FORMATS
from convit_ssl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from convit_ssl.models import list_models


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `convit-ssl analyze` and tools/analyze.py."""
    parser.add_argument(
        "checkpoint", help="checkpoint file: vissl, timm / official release, or VISSL's built-in convit"
    )
    parser.add_argument("--images", required=True, help="folder of images (searched recursively, sorted by path)")
    parser.add_argument("--out", required=True, help="output folder (created) for analysis.json and the PNGs")
    parser.add_argument(
        "--format", default="auto", choices=("auto",) + FORMATS, help="checkpoint format (default: detect it)"
    )
    parser.add_argument(
        "--arch",
        default=None,
        choices=list_models(),
        metavar="ARCH",
        help="architecture, when the shapes do not show the head count (no GPSA block); "
        f"one of {', '.join(list_models())}",
    )
    parser.add_argument(
        "--norm-eps", type=float, default=None, help="LayerNorm eps (default 1e-6; 1e-5 for VISSL's built-in convit)"
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=DEFAULT_NUM_IMAGES,
        help=f"use the first N images in sorted order (default {DEFAULT_NUM_IMAGES})",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the square model input (default: the checkpoint's image size)",
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=list(IMAGENET_MEAN),
        help="normalisation mean per channel (default ImageNet's)",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs="+",
        default=list(IMAGENET_STD),
        help="normalisation std per channel (default ImageNet's)",
    )
    parser.add_argument(
        "--query",
        type=int,
        nargs=2,
        default=None,
        metavar=("ROW", "COL"),
        help="query patch of the attention maps (default: the centre patch)",
    )
    parser.add_argument(
        "--log",
        default=None,
        metavar="JSONL",
        help="training log (<CHECKPOINT.DIR>/convit_analysis.jsonl) for the curves figure",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def run_args(args: argparse.Namespace) -> list[Path]:
    return run_analysis(
        args.checkpoint,
        args.images,
        args.out,
        fmt=args.format,
        arch=args.arch,
        norm_eps=args.norm_eps,
        num_images=args.num_images,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        query=args.query,
        log_path=args.log,
        device=args.device,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str], prog: str = "analyze") -> list[Path]:
    """Entry point of tools/analyze.py: parse `argv` and run."""
    parser = add_arguments(
        argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return run_args(parser.parse_args(list(argv)))
