#!/usr/bin/env python
"""VISSL's tools/train_svm.py for convit_ssl, on the CPU as on GPUs: extract the
features of a config, then per-class linear SVMs with cross-validated cost, test mAP (VOC07 protocol).

    python tools/train_svm.py config=NAME config.MODEL.WEIGHTS_INIT.PARAMS_FILE=<checkpoint> [overrides]

Same as `convit-ssl svm ...`; see convit_ssl/vissl/benchmarks.py.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["svm", *sys.argv[1:]]))
