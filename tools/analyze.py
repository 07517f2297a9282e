#!/usr/bin/env python
"""The paper's figures for a ConViT checkpoint: gating, nonlocality, attention maps, training curves.

    python tools/analyze.py CHECKPOINT --images FOLDER --out DIR [--log RUN/convit_analysis.jsonl] [...]

CHECKPOINT is any format the converter reads (VISSL, timm or the official
release, VISSL's built-in convit). Writes analysis.json and PNGs into DIR;
see `python tools/analyze.py --help` and convit_ssl/analyze.py.
"""

import sys

import convit_ssl  # noqa: F401  (compat shims before VISSL/timm imports)
from convit_ssl.analyze import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"analyze: error: {e}", file=sys.stderr)
        sys.exit(2)
