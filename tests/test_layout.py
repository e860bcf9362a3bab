"""Size limits that keep every module readable, and ARCHITECTURE.md as a complete map.

No module under prunekit/ or a room is longer than 500 lines; no function is longer than 80
lines, counted from its first body statement (docstring included) to its last line, so a
long parameter list (typer options with their help texts) does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("prunekit", "prune", "criteria", "finetune", "analysis", "models", "export")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def function_lengths(source: str) -> dict[str, int]:
    """'name:line' -> body length (first body statement to end_lineno) of every function,
    methods and nested functions included."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[f"{node.name}:{node.lineno}"] = node.end_lineno - node.body[0].lineno + 1
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_folder_has_modules():
    for folder in FOLDERS:
        assert list((ROOT / folder).glob("*.py")), folder


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_module_is_at_most_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{rel(path)} has {lines} lines; split it by concern"


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_functions_are_at_most_80_lines(path):
    long = {k: n for k, n in function_lengths(path.read_text()).items() if n > MAX_FUNCTION_LINES}
    assert long == {}, f"{rel(path)}: functions longer than {MAX_FUNCTION_LINES} lines"


def test_function_length_skips_the_parameter_list_and_counts_the_body():
    params = "\n".join(f"    a{i}: int = 0," for i in range(100))
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    source = f'def typer_command(\n{params}\n) -> None:\n    """Doc."""\n{body}\n'
    assert function_lengths(source) == {"typer_command:1": 82}  # docstring + 81 statements
    nested = "class A:\n    def m(self):\n        def inner():\n            return 1\n\n"
    nested += "        return 2\n"
    assert function_lengths(nested) == {"m:2": 4, "inner:3": 1}


def test_architecture_map_names_every_wiring_module_and_room():
    """ARCHITECTURE.md is the newcomer's map: every module in prunekit/ and every room."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    missing = [p.name for p in sorted((ROOT / "prunekit").glob("*.py")) if p.name not in text]
    missing += [f"{room}/" for room in FOLDERS[1:] if f"{room}/" not in text]
    assert missing == [], "add these to ARCHITECTURE.md"
