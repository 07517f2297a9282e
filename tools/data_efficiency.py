#!/usr/bin/env python
"""The paper's data-efficiency comparison at small scale: supervised ConViT
against the DeiT of identical dimensions on 5, 10, 25, 50 and 100 % of the
digits' training split (`DATA.TRAIN.SUBSET`, random_per_class, one subset per
seed), every run seeing the same number of images, 3 seeds each.

    python tools/data_efficiency.py --out DIR                  # the sweep (about 45 minutes on 2 cores)
    python tools/data_efficiency.py --out DIR --table          # its markdown table
    python tools/data_efficiency.py --out DIR --quick          # a 2-block trunk, 25 and 100 %, one seed

Writes ``DIR/<arch>/f<fraction>_seed<seed>/`` (VISSL run folders),
``DIR/results.json`` (every run, and per fraction the mean, spread, gap and
verdict) and ``DIR/data_efficiency.png``. Finished runs are skipped, so an
interrupted sweep resumes. See convit_ssl/experiments/data_efficiency.py.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from convit_ssl.analysis.plots import save_png
from convit_ssl.data.digits import train_val_folders
from convit_ssl.experiments import data_efficiency as de
from convit_ssl.processes import Stopped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/data_efficiency.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data", default=None, help="train/<class>/*, val/<class>/* (default: the digits)")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help=f"default: {de.FRACTIONS}")
    parser.add_argument("--arch", nargs="+", default=list(de.NAMES), choices=list(de.NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default: {de.SEEDS}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a CI-sized check: 2-block 32-wide trunk, batch 16, one epoch's worth of images, "
        "fractions 0.25 and 1, seed 0 (unless given)",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the markdown table of <out>/results.json; run nothing"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    path = out / "results.json"
    if args.table:
        if not path.is_file():
            parser.error(f"--table: {path} does not exist")
        print(de.markdown_table(json.loads(path.read_text())))
        return 0
    fractions = args.fractions or ((0.25, 1.0) if args.quick else de.FRACTIONS)
    seeds = args.seeds or ((0,) if args.quick else de.SEEDS)
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        parser.error(f"--fractions must lie in (0, 1], got {bad}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        train, val = train_val_folders(args.data, out)
    except ValueError as e:
        parser.error(str(e))
    header = {
        "command": " ".join(["tools/data_efficiency.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    try:
        results = de.sweep(
            out, train, val, fractions, args.arch, seeds, extra=de.QUICK_OVERRIDES if args.quick else (), header=header
        )
    except Stopped as e:
        print(f"data_efficiency: {e}; the same command resumes it (finished runs are skipped)", file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        parser.error(str(e))
    save_png(de.figure(results), out / "data_efficiency.png")
    print("\n" + de.markdown_table(results))
    print(f"\nresults: {path}\nfigure:  {out / 'data_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
