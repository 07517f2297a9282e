#!/usr/bin/env python
"""Pretrain the demo-size ConViT (or its DeiT twin) with each self-supervised
method on the digits, then measure kNN and linear-probe top-1 against the same
trunk at random init.

    python tools/ssl_quality.py --method simclr dino --arch convit deit --seeds 0 1 --out DIR

See convit_ssl/cli/ssl_quality.py. Each VISSL run is a `convit-ssl run` child process.
"""

import sys

from convit_ssl.cli.ssl_quality import main

if __name__ == "__main__":
    sys.exit(main())
