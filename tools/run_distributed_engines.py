#!/usr/bin/env python
"""VISSL's run_distributed_engines.py for convit_ssl: same arguments, from any directory.

    python tools/run_distributed_engines.py config=test/convit_ssl/supervised_micro_synthetic \
        config.CHECKPOINT.DIR=/tmp/run

Same as `convit-ssl run ...`.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
