#!/usr/bin/env python
"""VISSL's tools/train_svm_low_shot.py for convit_ssl, on the CPU as on GPUs: extract the
features of a config, then low-shot SVMs on k positives per class (SVM.low_shot: voc or places205).

    python tools/train_svm_low_shot.py config=NAME config.MODEL.WEIGHTS_INIT.PARAMS_FILE=<checkpoint> [overrides]

Same as `convit-ssl low-shot ...`; see convit_ssl/vissl/benchmarks.py.
"""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main(["low-shot", *sys.argv[1:]]))
