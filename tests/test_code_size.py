"""The size rule of the library: no function over 60 lines, no class over 200 (from its ``def``/``class`` line to its
last line), unless a ``# size: <reason>`` comment sits on the line right above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 200}


def _oversized(root: Path = ROOT):
    found = []
    for path in sorted([*root.glob("dptrain/**/*.py"), *root.glob("accountants/**/*.py")]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            limit = LIMITS.get(type(node))
            if limit is None:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = node.end_lineno - node.lineno + 1
            excused = first >= 2 and lines[first - 2].strip().startswith("# size:")
            if size > limit and not excused:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({size} lines > {limit})")
    return found


def test_no_function_or_class_over_the_limit():
    assert not _oversized()


def test_the_rule_sees_an_oversized_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "dptrain").mkdir()
    (tmp_path / "dptrain" / "big.py").write_text(f"def big():\n{body}\n\n\n# size: a table\ndef excused():\n{body}\n")
    assert _oversized(tmp_path) == ["dptrain/big.py:1 big (62 lines > 60)"]
