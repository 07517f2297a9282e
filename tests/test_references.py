"""Every repository path that the docs, the configs and the code's comments and
docstrings name exists
(a tool, a doc, a test file, a config: tools/analyze.py, docs/DEMO.md,
tests/test_references.py, configs/config/demo/convit_ssl/digits_linear.yaml).

A path is looked up from the repository root, then from the naming file's folder
and each folder above it (a config names its neighbours relatively), and a
`configs/...` path also in VISSL's installed config tree. A component in capitals
(`configs/convert/NAME.yaml`) is a placeholder."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import vissl

from helpers import REPO

PATH = re.compile(
    r"(?<![\w/.<-])((?:convit_ssl|tools|tests|docs|configs|\.ci)/[\w./-]*\w\.(?:py|md|yaml|json|png|txt|toml))\b"
)
VISSL_ROOT = Path(vissl.__file__).resolve().parents[1]  # site-packages: VISSL's `configs` package sits beside it


def named_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]
    for top in ("convit_ssl", "tools", "tests", "configs"):
        files += sorted(
            p for p in (REPO / top).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
        )
    return files


def exists(name: str, named_in: Path) -> bool:
    if any(part.isupper() for part in Path(name).with_suffix("").parts):
        return True
    roots = [REPO, *[folder for folder in named_in.parents if REPO in (folder, *folder.parents)]]
    if name.startswith("configs/"):
        roots.append(VISSL_ROOT)
    return any((root / name).exists() for root in roots)


def prose(path: Path) -> list[tuple[int, str]]:
    """(row, text) of what a file says to its reader: a Python file's comments and
    docstrings (not its string values), any other file's lines."""
    text = path.read_text()
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    said = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(
            node
        ):
            first = node.body[0]
            said += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
    return said


def missing_references(files: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{row}: {match.group(1)}"
        for path in files
        for row, line in prose(path)
        for match in PATH.finditer(line)
        if not exists(match.group(1), path)
    ]


def test_a_missing_path_is_found(tmp_path):
    probe = REPO / "docs" / ".references_probe.md"  # under the repository: paths are reported relative to it
    missing = "tools/no_such_tool.py"
    probe.write_text(f"see tools/analyze.py, docs/DEMO.md and {missing}; configs/convert/NAME.yaml\n")
    try:
        assert missing_references([probe]) == [f"docs/{probe.name}:1: {missing}"]
    finally:
        probe.unlink()


def test_every_named_path_exists():
    assert missing_references(named_files()) == []


TEST_NAME = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")


def missing_tests(files: list[Path]) -> list[str]:
    """`tests/FILE.py::test_NAME` references (the docs' fault table) whose test function does not exist."""
    missing = []
    for path in files:
        for row, line in prose(path):
            for match in TEST_NAME.finditer(line):
                if any(part.isupper() for part in Path(match.group(1)).with_suffix("").parts):
                    continue  # a placeholder
                test_file = REPO / match.group(1)
                defined = test_file.is_file() and re.search(
                    rf"^def {match.group(2)}\(", test_file.read_text(), re.MULTILINE
                )
                if not defined:
                    missing.append(f"{path.relative_to(REPO)}:{row}: {match.group(0)}")
    return missing


def test_every_named_test_exists():
    probe = REPO / "docs" / ".references_probe.md"
    probe.write_text("tests/test_references.py::test_every_named_test_exists, tests/test_references.py::test_nope\n")
    try:
        assert missing_tests([probe]) == [f"docs/{probe.name}:1: tests/test_references.py::test_nope"]
    finally:
        probe.unlink()
    assert missing_tests(named_files()) == []
