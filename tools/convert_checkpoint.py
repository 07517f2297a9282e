#!/usr/bin/env python
"""Convert ConViT checkpoints between VISSL, timm and VISSL's built-in convit.

    python tools/convert_checkpoint.py config=timm_to_vissl input=IN output=OUT [key=value ...]

Configs live in configs/convert/ (see their comments for every field).
"""

import sys

import convit_ssl  # noqa: F401  (compat shims before VISSL/timm imports)
from convit_ssl.convert import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"convert_checkpoint: error: {e}")
