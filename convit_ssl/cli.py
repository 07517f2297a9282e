"""The `convit-ssl` command.

    convit-ssl run config=NAME [hydra overrides]    # = tools/run_distributed_engines.py
    convit-ssl knn config=NAME [overrides]           # = tools/nearest_neighbor_test.py: extract, weighted kNN
    convit-ssl svm config=NAME [overrides]           # = tools/train_svm.py: extract, per-class linear SVMs (VOC07)
    convit-ssl low-shot config=NAME [overrides]      # = tools/train_svm_low_shot.py: low-shot SVMs (VOC07, Places205)
    convit-ssl convert config=NAME input=IN output=OUT [key=value]   # = tools/convert_checkpoint.py
    convit-ssl demo [--out DIR] [--data DIR]         # the embedded demo (make demo)
    convit-ssl analyze CHECKPOINT --images DIR --out DIR [--log JSONL]   # = tools/analyze.py: figures + JSON
    convit-ssl models                                # list architectures
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import convit_ssl  # noqa: F401  (compat shims + trunk registration; ranks re-import __main__)

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError)
BENCHMARK_COMMANDS = {"knn": "knn", "svm": "svm", "low-shot": "low_shot"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        # Hydra overrides pass through untouched (argparse would mangle `config=...`).
        from convit_ssl.vissl.launcher import run

        run(argv[1:])
        return 0
    if argv and argv[0] in BENCHMARK_COMMANDS:
        from convit_ssl.vissl import benchmarks

        benchmark = BENCHMARK_COMMANDS[argv[0]]
        try:
            runner, config, node_id = benchmarks.prepare(benchmark, argv[1:])
        except USER_ERRORS as e:
            print(f"convit-ssl {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        results = runner(config, node_id)
        for line in benchmarks.summary_lines(benchmark, results):
            print(line)
        return 0
    if argv and argv[0] == "convert":
        from convit_ssl.convert import main as convert_main

        try:
            convert_main(argv[1:])
        except USER_ERRORS as e:
            print(f"convit-ssl convert: error: {e}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="convit-ssl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a VISSL config: convit-ssl run config=NAME [overrides]")
    for command, what in (("knn", "weighted kNN"), ("svm", "per-class linear SVMs (VOC07)"),
                          ("low-shot", "low-shot SVMs (VOC07 / Places205)")):
        sub.add_parser(command, help=f"extract features of a VISSL config, then {what}: convit-ssl {command} config=NAME")
    sub.add_parser("convert", help="convert a checkpoint: convit-ssl convert config=NAME input=IN output=OUT [key=value]")
    demo = sub.add_parser("demo", help="supervised training, linear probe and fine-tune on an image folder")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--data", default=None, help="folder with train/<class>/* and val/<class>/* (default: scikit-learn digits)")
    demo.add_argument("--epochs", type=int, default=None, help="supervised epochs (default: the config's)")
    demo.add_argument("--ssl-epochs", type=int, default=None, help="self-supervised (SimCLR) epochs (default: 12)")
    from convit_ssl.analyze import add_arguments as analyze_arguments

    analyze_arguments(sub.add_parser(
        "analyze", help="gating, nonlocality and attention-map figures (and analysis.json) of a checkpoint",
        description="Gating, nonlocality and attention-map figures (and analysis.json) of a ConViT checkpoint "
                    "in any format the converter reads."))
    sub.add_parser("models", help="list the architectures create_model accepts")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from convit_ssl.demo import run_demo

        try:
            run_demo(args.out, args.data, args.epochs, args.ssl_epochs)
        except USER_ERRORS as e:
            parser.exit(2, f"convit-ssl demo: error: {e}\n")
    elif args.command == "analyze":
        from convit_ssl.analyze import run_args

        try:
            run_args(args)
        except USER_ERRORS as e:
            parser.exit(2, f"convit-ssl analyze: error: {e}\n")
    elif args.command == "models":
        from convit_ssl.models import ARCHITECTURES

        for name, spec in ARCHITECTURES.items():
            print(f"{name:<18} " + " ".join(f"{k}={v}" for k, v in spec.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
