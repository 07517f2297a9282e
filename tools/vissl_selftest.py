#!/usr/bin/env python
"""VISSL's own test suite under convit_ssl's patches, file by file, as a table
(the one in docs/STACK.md).

    git clone --branch v0.1.6 https://github.com/facebookresearch/vissl DIR
    python tools/vissl_selftest.py --src DIR [--only test_losses test_mlp] [--timeout 900] [--json OUT]

Each test file runs in its own process, against the installed VISSL with the
patches applied as every convit_ssl entry point applies them
(`convit_ssl.experiments.vissl_selftest`). Prints one line per file as it ends,
then the markdown table; exits 1 when a test failed.
"""

import argparse
import dataclasses
import json
import sys

from convit_ssl.experiments import vissl_selftest as selftest
from convit_ssl.files import atomic_write_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="a VISSL checkout (tag v0.1.6), or its tests/ folder")
    parser.add_argument("--only", nargs="*", default=[], help="run only the files whose names contain one of these")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per file (default 900)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    def progress(r: selftest.FileResult) -> None:
        print(f"{r.file}: {r.passed} passed, {r.failed} failed, {r.skipped} skipped, {r.seconds:.0f} s", flush=True)

    try:
        results = selftest.run_suite(args.src, args.only, args.timeout, progress)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(selftest.markdown_table(results))
    if args.json:
        rows = [dataclasses.asdict(r) | {"skips": dict(r.skips)} for r in results]
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
