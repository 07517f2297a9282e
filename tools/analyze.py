#!/usr/bin/env python
"""The paper's figures for a ConViT checkpoint: gating, nonlocality, attention maps, training curves.

    python tools/analyze.py CHECKPOINT --images FOLDER --out DIR [--log RUN/convit_analysis.jsonl] [...]

CHECKPOINT is any format the converter reads (VISSL, timm or the official
release, VISSL's built-in convit). Writes analysis.json and PNGs into DIR;
see `python tools/analyze.py --help` and convit_ssl/analysis/pipeline.py. Same as
`convit-ssl analyze ...`.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
