#!/usr/bin/env python
"""Convert ConViT checkpoints between VISSL, timm and VISSL's built-in convit.

    python tools/convert_checkpoint.py config=timm_to_vissl input=IN output=OUT [key=value ...]

Configs live in configs/convert/ (see their comments for every field). Same as
`convit-ssl convert ...`.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
