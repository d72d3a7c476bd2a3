"""Functions short enough to read at once: none in ledger/ or services/ (generated stubs aside)
is longer than FUNCTION_LINES_MAX lines, from its `def` to its last line."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FUNCTION_LINES_MAX = 70


def long_functions(root: Path, base: Path = REPO) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if "_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > FUNCTION_LINES_MAX:
                    found.append(f"{path.relative_to(base)}:{node.lineno} {node.name}: {lines}")
    return found


def test_no_function_is_longer_than_the_bound() -> None:
    found = [f for root in ("ledger", "services") for f in long_functions(REPO / root)]
    assert not found, "functions over the bound:\n" + "\n".join(found)


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES_MAX))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "short.py").write_text("def short():\n    return 1\n")
    assert long_functions(tmp_path, tmp_path) == [f"long.py:1 long: {FUNCTION_LINES_MAX + 1}"]
