"""The import rule of design.md section 2 (and ARCHITECTURE.md), checked with ``ast``.

Rooms (prune, criteria, finetune, analysis, models, export) import from prunekit only
prunekit.types, prunekit.errors, prunekit.prune.masks, prunekit.prune.groups and their
own room: never another room, never a module of prunekit/. In prunekit/, the base modules
(the shared vocabulary, checkpoints, data specs, the recipe schema, tasks, trust, limits,
the console) use at most one room; every other module is the wiring layer, which joins
rooms: one concern per module (settings, loop, resume, report, api, recipe_run, ...),
their top-level imports free of cycles, never importing the CLI above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("prune", "criteria", "finetune", "analysis", "models", "export")
SHARED = ("prunekit.types", "prunekit.errors", "prunekit.prune.masks", "prunekit.prune.groups")
# prunekit/ modules that are not wiring: at most one room each (types and errors: none, as
# every room imports them). Every other module in prunekit/ is wiring or CLI.
BASE = {
    "types.py": 0,
    "errors.py": 0,
    "checkpoint.py": 1,
    "data.py": 1,
    "recipe.py": 1,
    "tasks.py": 1,
    "trust.py": 1,
    "limits.py": 1,
    "console.py": 1,
}
PRUNEKIT = sorted((ROOT / "prunekit").glob("*.py"))


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


def is_cli(name: str) -> bool:
    """The CLI and what only it uses (printing): above the wiring layer."""
    return name.startswith("cli") or name in ("console.py", "__main__.py")


@pytest.mark.parametrize("path", PRUNEKIT, ids=lambda p: p.name)
def test_base_modules_use_at_most_one_room_and_the_rest_is_wiring(path):
    names = imported_modules(path.read_text(), "prunekit")
    if path.name in BASE:
        assert len(rooms_used(names)) <= BASE[path.name], sorted(rooms_used(names))


def test_the_wiring_layer_joins_rooms():
    """The split kept the joins in the wiring modules (a test that could notice them gone)."""
    joined = {
        p.name for p in PRUNEKIT if len(rooms_used(imported_modules(p.read_text(), "prunekit"))) > 1
    }
    assert {"loop.py", "api.py", "recipe_run.py", "preflight.py", "ntklog.py"} <= joined
    assert not joined & set(BASE)


@pytest.mark.parametrize("path", PRUNEKIT, ids=lambda p: p.name)
def test_library_modules_never_import_the_cli(path):
    if is_cli(path.name):
        return
    names = imported_modules(path.read_text(), "prunekit")
    cli = sorted(n for n in names if n.startswith(("prunekit.cli", "prunekit.console")))
    assert cli == []


def top_level_prunekit_imports(path: Path) -> set[str]:
    """Modules of prunekit/ that ``path`` imports when it is imported (module body only:
    imports inside functions and ``if TYPE_CHECKING:`` run later or never)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = imported_modules(ast.unparse(ast.Module(body=body, type_ignores=[])), "prunekit")
    local = {f"prunekit.{p.stem}" for p in PRUNEKIT if p.name != "__init__.py"}
    return names & local


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports) as a path, or []."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node], path = 1, path + [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path)):
                return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return []


def test_prunekit_modules_import_each_other_without_cycles():
    graph = {f"prunekit.{p.stem}": top_level_prunekit_imports(p) for p in PRUNEKIT}
    assert graph["prunekit.loop"] >= {"prunekit.settings", "prunekit.resume", "prunekit.report"}
    assert find_cycle(graph) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_pipeline_only_re_exports_the_modules_that_own_its_names():
    """prunekit.pipeline (the module before the split) defines nothing: imports and __all__."""
    import prunekit.pipeline as pipeline

    tree = ast.parse((ROOT / "prunekit" / "pipeline.py").read_text())
    kinds = {type(n).__name__ for n in tree.body[1:]}  # after the docstring
    assert kinds <= {"ImportFrom", "Assign"}
    assert [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets] == ["__all__"]
    for name in pipeline.__all__:
        obj = getattr(pipeline, name)
        owner = getattr(obj, "__module__", None)
        if owner and owner.startswith("prunekit."):
            assert owner != "prunekit.pipeline", name


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["prune", "--help"], ["validate", "recipes/ci-digits-obd.yaml"]],
    ids=["help", "prune help", "validate"],
)
def test_help_and_validate_load_neither_export_nor_plotting(argv):
    """`prunekit --help` and `prunekit validate` stay fast: onnx, onnxruntime and matplotlib
    load only when an export or a plot is made."""
    import subprocess
    import sys

    probe = (
        "import contextlib, io, sys\n"
        "from prunekit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main({argv!r}) == 0\n"
        "heavy = ('onnx', 'onnxruntime', 'onnxscript', 'matplotlib')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


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
