#!/usr/bin/env python
"""VISSL's run_distributed_engines.py for convit_ssl: same arguments, from any directory.

    python tools/run_distributed_engines.py config=test/convit_ssl/supervised_micro_synthetic \
        config.CHECKPOINT.DIR=/tmp/run

Same as `convit-ssl run ...`. `import convit_ssl.vissl` stays at module top level:
VISSL's spawned ranks re-import __main__, and the patches and trunk registration
must exist in each of them.
"""

import sys

from convit_ssl.cli import main, setup_vissl

setup_vissl()  # patches + registration, at top level: in every spawned rank too

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
