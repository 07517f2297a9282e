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
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from convit_ssl.processes import Failed, Stopped

BENCHMARK_COMMANDS = {"knn": "knn", "svm": "svm", "low-shot": "low_shot"}
# Set to show the traceback of a user error instead of its one line.
TRACEBACK_ENV = "CONVIT_SSL_TRACEBACK"


def quiet_library_warnings() -> None:
    """Deprecation warnings from VISSL's dependencies that say nothing to a user of
    the command (our entry points only; library users keep their filters)."""
    for module in (
        "torchvision",
        "torch.jit",
        "torch.distributed",
        "fvcore",
        "iopath",
        "hydra",
        "classy_vision",
        "vissl",
        "timm",
    ):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can raise before any work starts: bad config, path, checkpoint."""
    errors: list[type[BaseException]] = [ValueError, KeyError, FileNotFoundError, FileExistsError]
    for module, name in (("hydra.errors", "HydraException"), ("omegaconf.errors", "OmegaConfBaseException")):
        if module in sys.modules:  # a config error can come only from a library already loaded
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


class CommandError(Exception):
    """A user error of `command`, reported by `main` in one line with exit code 2."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"convit-ssl {command}: error: {message}")


def checked(command: str, step: Callable[[], Any]) -> Any:
    """Run `step` (the part of a command that reads the user's input); a user error
    becomes a `CommandError` (re-raised as is with CONVIT_SSL_TRACEBACK=1)."""
    try:
        return step()
    except user_errors() as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str is a repr
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise CommandError(command, " ".join(lines[:2]) or type(e).__name__) from None


def main(argv: list[str] | None = None) -> int:
    """The command; 0 on success, 2 on a user error (one line on stderr)."""
    quiet_library_warnings()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except CommandError as e:
        print(e, file=sys.stderr)
        return 2
    except (Stopped, Failed) as e:  # a stop signal or a full disk: everything the command started has ended
        command = (sys.argv[1:] if argv is None else argv)[:1] or ["?"]
        print(f"convit-ssl {command[0]}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `convit-ssl models | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "run":
        # Hydra overrides pass through untouched (argparse would mangle `config=...`).
        from convit_ssl.vissl.run import launcher

        prepared = checked("run", lambda: launcher.prepare(argv[1:]))
        launcher.launch(*prepared)
        return 0
    if argv and argv[0] in BENCHMARK_COMMANDS:
        # start-up: each subcommand imports what it needs (VISSL here)
        from convit_ssl.vissl import benchmarks

        benchmark = BENCHMARK_COMMANDS[argv[0]]
        runner, config, node_id = checked(argv[0], lambda: benchmarks.prepare(benchmark, argv[1:]))
        results = runner(config, node_id)
        for line in benchmarks.summary_lines(benchmark, results):
            print(line)
        return 0
    if argv and argv[0] == "convert":
        # start-up: each subcommand imports what it needs (the converter here)
        from convit_ssl.cli.convert import main as convert_main

        checked("convert", lambda: convert_main(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(
        prog="convit-ssl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a VISSL config: convit-ssl run config=NAME [overrides]")
    for command, what in (
        ("knn", "weighted kNN"),
        ("svm", "per-class linear SVMs (VOC07)"),
        ("low-shot", "low-shot SVMs (VOC07 / Places205)"),
    ):
        sub.add_parser(
            command, help=f"extract features of a VISSL config, then {what}: convit-ssl {command} config=NAME"
        )
    sub.add_parser(
        "convert", help="convert a checkpoint: convit-ssl convert config=NAME input=IN output=OUT [key=value]"
    )
    demo = sub.add_parser(
        "demo",
        help="supervised, data-efficiency, SimCLR, linear-probe and fine-tune runs on "
        "an image folder, then the analyses",
    )
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument(
        "--data", default=None, help="folder with train/<class>/* and val/<class>/* (default: scikit-learn digits)"
    )
    demo.add_argument("--epochs", type=int, default=None, help="supervised epochs (default: the config's)")
    demo.add_argument("--ssl-epochs", type=int, default=None, help="self-supervised (SimCLR) epochs (default: 20)")
    demo.add_argument(
        "--probe-epochs",
        type=int,
        default=None,
        help="the linear probes' images seen, in epochs of the whole training set, and the fine-tune's "
        "epochs (default: the configs', 5 and 3)",
    )
    # start-up: each subcommand imports what it needs (the analyses here)
    from convit_ssl.cli.analyze import add_arguments as analyze_arguments

    analyze_arguments(
        sub.add_parser(
            "analyze",
            help="gating, nonlocality and attention-map figures (and analysis.json) of a checkpoint",
            description="Gating, nonlocality and attention-map figures (and analysis.json) of a ConViT checkpoint "
            "in any format the converter reads.",
        )
    )
    sub.add_parser("models", help="list the architectures create_model accepts")
    args = parser.parse_args(argv)
    if args.command == "demo":
        # start-up: each subcommand imports what it needs (the demo here)
        from convit_ssl.experiments.demo import run_demo

        checked("demo", lambda: run_demo(args.out, args.data, args.epochs, args.ssl_epochs, args.probe_epochs))
    elif args.command == "analyze":
        # start-up: each subcommand imports what it needs (the analyses here)
        from convit_ssl.cli.analyze import run_args

        checked("analyze", lambda: run_args(args))
    elif args.command == "models":
        # start-up: each subcommand imports what it needs (torch here)
        from convit_ssl.models import ARCHITECTURES

        for name, spec in ARCHITECTURES.items():
            print(f"{name:<18} " + " ".join(f"{k}={v}" for k, v in spec.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
