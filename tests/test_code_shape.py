"""Functions readable in one sitting: none over 80 lines in app.py, engine/ or ui/ (counted by
Python's own parser, from the `def` line to the function's last line, decorators not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 80


def long_functions() -> list[str]:
    files = [ROOT / "app.py", *sorted((ROOT / "engine").rglob("*.py")), *sorted((ROOT / "ui").rglob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


def test_the_check_sees_a_long_function(tmp_path, monkeypatch):
    """The walk really reaches nested functions and methods: a long one in a class is found."""
    body = "\n".join(f"        x{i} = {i}" for i in range(LIMIT))
    tree = ast.parse(f"class A:\n    def f(self):\n{body}\n")
    method = tree.body[0].body[0]
    assert method.end_lineno - method.lineno + 1 == LIMIT + 1
