#!/usr/bin/env python
"""What importing convit_ssl costs a PyTorch user: wall time of fresh interpreters
that import torch alone, convit_ssl.models, convit_ssl (the same, plus the
package's top level) and convit_ssl.vissl (VISSL set up), alternated, medians.

    python tools/benchmark_import.py [--repeats 7] [--json out.json]

Prints each median and its ratio to `import torch`; the extra cost of
`convit_ssl.models` over torch is what the model adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STATEMENTS = {
    "torch": "import torch",
    "convit_ssl.models": "import convit_ssl.models",
    "convit_ssl": "import convit_ssl",
    "convit_ssl.vissl": "import convit_ssl.vissl",
}


def once(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for statement in STATEMENTS.values():  # warm the file cache
        once(statement)
    times = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            times[name].append(once(statement))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'import':<20}{'median s':>10}{'x torch':>9}   (fresh interpreters, {args.repeats} each, alternated)")
    for name, median in medians.items():
        print(f"{name:<20}{median:>10.3f}{median / medians['torch']:>9.2f}")
    print(f"convit_ssl.models adds {medians['convit_ssl.models'] - medians['torch']:+.3f} s to import torch")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "seconds": times, "median": medians}, indent=2))


if __name__ == "__main__":
    main()
