#!/usr/bin/env python
"""VISSL's tools/nearest_neighbor_test.py for convit_ssl, on the CPU as on GPUs: extract the
features of a config, then weighted kNN of TEST against TRAIN (NEAREST_NEIGHBOR.TOPK, SIGMA, L2_NORM_FEATS).

    python tools/nearest_neighbor_test.py config=NAME config.MODEL.WEIGHTS_INIT.PARAMS_FILE=<checkpoint> [overrides]

Same as `convit-ssl knn ...`; see convit_ssl/vissl/benchmarks.py.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["knn", *sys.argv[1:]]))
