"""The import rule of design.md section 2, checked with ``ast``.

Rooms (prune, criteria, finetune, analysis, models, export) import from prunekit only
prunekit.types, prunekit.errors, prunekit.prune.masks and their own room; in prunekit/,
only pipeline.py and cli.py import from two different rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("prune", "criteria", "finetune", "analysis", "models", "export")
SHARED = ("prunekit.types", "prunekit.errors", "prunekit.prune.masks")
WIRING = ("pipeline.py", "cli.py")


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module imported anywhere in ``source`` (functions included).

    ``package`` is the dotted package of the file, to resolve relative imports.
    ``from prunekit.x import y`` yields both ``prunekit.x`` and ``prunekit.x.y`` (y may be
    a submodule).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "prunekit" and parts[1] in ROOMS:
        return parts[1]
    return None


def is_shared(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SHARED)


def room_violations(module_names: set[str], own_room: str) -> list[str]:
    """prunekit imports a file of ``own_room`` may not make."""
    bad = []
    for name in sorted(module_names):
        if name != "prunekit" and not name.startswith("prunekit."):
            continue
        if is_shared(name) or room_of(name) == own_room:
            continue
        parent = name.rsplit(".", 1)[0]
        if is_shared(parent) or room_of(parent) == own_room:
            continue  # ``from prunekit.errors import X`` also yields prunekit.errors.X
        bad.append(name)
    return bad


def rooms_used(module_names: set[str]) -> set[str]:
    return {room_of(n) for n in module_names if room_of(n) and not is_shared(n)}


def room_files():
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT / room).with_suffix("")
            package = ".".join(["prunekit", room, *rel.parts[:-1]])
            yield pytest.param(room, path, package, id=f"{room}/{path.name}")


def test_rooms_exist():
    for room in ROOMS:
        assert (ROOT / room / "__init__.py").is_file(), room
    assert len(list(room_files())) >= 20


@pytest.mark.parametrize(("room", "path", "package"), list(room_files()))
def test_rooms_import_only_shared_modules_and_their_own_room(room, path, package):
    names = imported_modules(path.read_text(), package)
    assert room_violations(names, room) == []


@pytest.mark.parametrize("path", sorted((ROOT / "prunekit").glob("*.py")), ids=lambda p: p.name)
def test_only_pipeline_and_cli_wire_rooms_together(path):
    names = imported_modules(path.read_text(), "prunekit")
    if path.name in WIRING:
        return
    assert len(rooms_used(names)) <= 1, sorted(rooms_used(names))


def test_the_checker_catches_violations():
    src = (
        "from prunekit.errors import SettingError\n"
        "from prunekit.prune.masks import apply_masks\n"
        "def f():\n"
        "    from prunekit.criteria import fisher\n"
        "    import prunekit.analysis.ntk\n"
        "    from prunekit import pipeline\n"
        "    from . import loop\n"
        "    from ..models import zoo\n"
    )
    names = imported_modules(src, "prunekit.finetune")
    assert "prunekit.finetune.loop" in names and "prunekit.models.zoo" in names
    assert room_violations(names, "finetune") == [
        "prunekit",
        "prunekit.analysis.ntk",
        "prunekit.criteria",
        "prunekit.criteria.fisher",
        "prunekit.models",
        "prunekit.models.zoo",
        "prunekit.pipeline",
    ]
    assert rooms_used(names) == {"criteria", "analysis", "finetune", "models"}
    assert room_violations(imported_modules(src.split("def")[0], "prunekit.finetune"), "x") == []
