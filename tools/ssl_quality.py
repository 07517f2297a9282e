#!/usr/bin/env python
"""Pretrain the demo-size ConViT (or its DeiT twin) with each self-supervised
method on the digits, then measure kNN and linear-probe top-1 against the same
trunk at random init.

    python tools/ssl_quality.py --method simclr dino --arch convit deit --seeds 0 1 --out DIR
    python tools/ssl_quality.py --out DIR --table      # the tables of docs/SSL_SMALL_SCALE.md

Each VISSL run is a `convit-ssl run` child process; what runs, and what
``DIR/results.json`` holds: convit_ssl/experiments/ssl_quality.py.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from convit_ssl.data.digits import train_val_folders
from convit_ssl.experiments import ssl_quality
from convit_ssl.experiments.overrides import ARCHS
from convit_ssl.processes import Stopped
from convit_ssl.vissl.configs import SSL_METHODS, small_scale_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/ssl_quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", nargs="+", default=["all"], help=f"one or more of {', '.join(SSL_METHODS)}, or all")
    parser.add_argument("--arch", nargs="+", default=["convit"], choices=sorted(ARCHS), help="convit and/or deit")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: each config's)")
    parser.add_argument("--data", default=None, help="train/<class>/*, val/<class>/* (default: the digits)")
    parser.add_argument("--no-linear", action="store_true", help="kNN only: skip the linear probes")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides of the pretraining runs, e.g. a narrower trunk for a quick check "
        "(with --no-linear: the probes' configs expect the default trunk)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--table", action="store_true", help="print the markdown tables of <out>/results.json; run nothing"
    )
    args = parser.parse_args(argv)
    if args.table:
        path = Path(args.out) / "results.json"
        if not path.is_file():
            parser.error(f"--table: {path} does not exist")
        print(ssl_quality.markdown_tables(json.loads(path.read_text())))
        return 0
    if any(o.startswith(("config.MODEL.TRUNK", "config.MODEL.HEAD")) for o in args.override) and not args.no_linear:
        parser.error(
            "--override of the trunk or head needs --no-linear: the linear probes' configs expect the default trunk"
        )
    methods = list(SSL_METHODS) if args.method == ["all"] else args.method
    try:
        for method in methods:
            small_scale_config(method)  # unknown names fail here, before any run
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        train, val = train_val_folders(args.data, out)
    except ValueError as e:
        parser.error(str(e))
    header = {
        "command": " ".join(["tools/ssl_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        ssl_quality.sweep(
            out, train, val, methods, args.arch, args.seeds, args.epochs, not args.no_linear, args.override, header
        )
    except Stopped as e:
        print(f"ssl_quality: {e}; the same command resumes it (finished runs are skipped)", file=sys.stderr)
        return e.exit_code
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
