"""House style the linter cannot see: an import inside a function says why it
is not at the top of its module (patch order, an optional dependency, the
start-up time of a command), in a comment on its line or on the line above
its block of imports."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def unexplained_function_imports(path: Path) -> list[str]:
    """`file:line: import` of each import inside a function with no comment on its
    block's lines or on the line above the block (a block: imports on consecutive lines)."""
    lines = path.read_text().splitlines()
    imports = sorted(
        {
            (node.lineno, node.end_lineno)
            for function in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.Import | ast.ImportFrom)
        }
    )
    blocks: list[list[tuple[int, int]]] = []
    for first, last in imports:
        if blocks and blocks[-1][-1][1] + 1 == first:
            blocks[-1].append((first, last))
        else:
            blocks.append([(first, last)])
    found = []
    for block in blocks:
        text = lines[block[0][0] - 2 : block[-1][1]]  # the line above, then the block
        if not any("#" in line for line in text):
            found += [f"{path.relative_to(REPO)}:{first}: {lines[first - 1].strip()}" for first, _ in block]
    return found


def test_the_finder_needs_a_reason(tmp_path, monkeypatch):
    module = REPO / "tests" / ".style_probe.py"
    module.write_text(
        "def a():\n    import json\n\n"
        "def b():\n    import json  # start-up: only this command needs it\n\n"
        "def c():\n    # patch order: VISSL after the shims\n    import os\n    from sys import path\n"
    )
    try:
        assert unexplained_function_imports(module) == [f"tests/{module.name}:2: import json"]
    finally:
        module.unlink()


def test_every_function_level_import_in_the_package_says_why():
    found = [
        line for path in sorted((REPO / "convit_ssl").rglob("*.py")) for line in unexplained_function_imports(path)
    ]
    assert found == [], "\n".join(found)
