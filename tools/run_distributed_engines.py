#!/usr/bin/env python
"""VISSL's run_distributed_engines.py for convit_ssl: same arguments, from any directory.

    python tools/run_distributed_engines.py config=test/convit_ssl/supervised_micro_synthetic \
        config.CHECKPOINT.DIR=/tmp/run

`import convit_ssl` stays at module top level: VISSL's spawned ranks re-import
__main__, and the shims and trunk registration must exist in each of them.
"""

import sys

import convit_ssl  # noqa: F401  (compat shims + trunk registration, before VISSL)
from convit_ssl.vissl.launcher import run

if __name__ == "__main__":
    run(sys.argv[1:])
