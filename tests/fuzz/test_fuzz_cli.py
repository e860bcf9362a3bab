"""Issue 13, the acceptance suite: no code runs from a file's contents, and every bad input
ends in one clear line.

Each case builds its own fixtures in a tmp folder, runs the real CLI in a child process with
that folder as working directory (see conftest.py) and asserts: the exit status (2 for user
errors), stderr is exactly one line starting with ``error:``, stdout is empty, no
``Traceback`` anywhere, nothing created, changed or removed anywhere under the case's tmp
tree (nor in the session's shared fixtures), and, for hostile inputs, that the file a
payload would create never appears.

Cases are grouped by command; ids read as the bad input.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from prunekit.rundir import partial_path

from .conftest import (
    EXAMPLE_ARCH,
    Case,
    Ctx,
    resume_recipe_tree,
    run_case,
    start_fresh,
    tree_diff,
    tree_state,
)

Builder = Callable[[Ctx], Case]
CASES: dict[str, dict[str, Builder]] = {
    c: {} for c in ("prune", "export", "validate", "explain", "run", "plot", "example")
}

# Cheap settings: a bad input that slips through ends in a quick full run (exit 0), not in
# minutes of compute. A case overrides one of them by repeating the option (the last wins).
FAST = [
    "--criterion", "magnitude", "--steps", "1", "--sparsity", "0.5", "--finetune-epochs", "0",
    "--final-epochs", "0", "--no-ntk", "--quiet", "--out", "run",
]  # fmt: skip
TRUST = ("--trust-code",)


def add(command: str, name: str):
    def register(fn: Builder) -> Builder:
        assert name not in CASES[command], name
        CASES[command][name] = fn
        return fn

    return register


# ------------------------------------------------------------------ payloads

EVIL_MODULE = """\
open({marker!r}, "w").close()  # runs when the module is imported


def build(**kwargs):
    import torch

    return torch.nn.Linear(1, 1)


def data():
    return None


def task():
    return None
"""

EVIL_CALL_MODULE = """\
def _hit():
    open({marker!r}, "w").close()


def data():  # runs only when called
    _hit()
    return None


def task():
    _hit()
    return None


def build(**kwargs):
    _hit()
    import torch

    return torch.nn.Linear(1, 1)
"""


def plant(ctx: Ctx) -> Path:
    """evil.py (creates the marker at import) and evilcall.py (when a function is called) in
    the working folder; returns the marker."""
    marker = ctx.marker()
    ctx.module("evil", EVIL_MODULE.format(marker=str(marker)))
    ctx.module("evilcall", EVIL_CALL_MODULE.format(marker=str(marker)))
    return marker


# Arch specs a file might carry: name -> template ({m}: the marker's absolute path). Each
# creates the marker when imported and called the way an arch spec is (module:callable,
# ?key=value as keyword arguments), except the ones marked inert (kept as refusal cases);
# test_payloads_are_live checks that.
ARCH_PAYLOADS = {
    "os.system": "os:system?command=touch {m}",
    "os.system url-encoded": "os:system?command=touch%20{m}",
    "posix.system": "posix:system?command=touch {m}",
    "subprocess.check_call": "subprocess:check_call?args=touch,{m}",
    "builtins.exec": "builtins:exec?source=import os;os.system('touch {m}')",
    "builtins.open": "builtins:open?file={m}&mode=w",
    "shutil.copyfile": "shutil:copyfile?src=evil.py&dst={m}",
    "importlib.import_module": "importlib:import_module?name=evil",
    "runpy.run_path": "runpy:run_path?path_name=evil.py",
    "module in cwd": "evil:build",
    "call in cwd": "evilcall:build",
    "prunekit-internal importer": "prunekit.tasks:load_task?spec=evil:build",
}
INERT_PAYLOADS = {"os.system url-encoded", "builtins.exec"}  # refused all the same
DATA_PAYLOADS = {
    "module in cwd": "evil:data",
    "call in cwd": "evilcall:data",
    "os.system": "os:system?command=touch {m}",
}


def payload(template: str, marker: Path) -> str:
    return template.format(m=str(marker))


def evil_checkpoint(ctx: Ctx, arch: str | None = EXAMPLE_ARCH, data: str = "digits") -> str:
    """The dense example's weights with metadata naming ``arch`` and ``data``."""
    meta = {"prunekit.data": data}
    if arch is not None:
        meta["prunekit.arch"] = arch
    return ctx.safetensors("evil.safetensors", meta=meta)


class Reduce:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ------------------------------------------------------------------ security: metadata


for _name, _template in ARCH_PAYLOADS.items():

    @add("prune", f"metadata arch {_name}")
    def _(ctx: Ctx, template=_template) -> Case:
        marker = plant(ctx)
        ckpt = evil_checkpoint(ctx, payload(template, marker))
        return Case(["prune", ckpt, *FAST], expect=TRUST, expect_any=("--arch",), markers=(marker,))


for _name, _template in DATA_PAYLOADS.items():

    @add("prune", f"metadata data {_name}")
    def _(ctx: Ctx, template=_template) -> Case:
        marker = plant(ctx)
        ckpt = evil_checkpoint(ctx, data=payload(template, marker))
        return Case(["prune", ckpt, *FAST], expect=TRUST, expect_any=("--data",), markers=(marker,))


for _name in ("os.system", "module in cwd", "importlib.import_module", "builtins.open"):

    @add("export", f"metadata arch {_name}")
    def _(ctx: Ctx, template=ARCH_PAYLOADS[_name]) -> Case:
        marker = plant(ctx)
        ckpt = evil_checkpoint(ctx, payload(template, marker))
        argv = ["export", ckpt, "--out", "m.onnx"]
        return Case(argv, expect=TRUST, expect_any=("--arch",), markers=(marker,), max_lines=20)


for _name in ("module in cwd", "call in cwd"):

    @add("export", f"metadata data {_name}")
    def _(ctx: Ctx, template=DATA_PAYLOADS[_name]) -> Case:
        marker = plant(ctx)
        ckpt = evil_checkpoint(ctx, data=payload(template, marker))
        argv = ["export", ckpt, "--out", "m.onnx"]
        return Case(argv, expect=TRUST, expect_any=("--data",), markers=(marker,), max_lines=20)


for _name, _value in {"os.system": "os:system", "empty": "", "long": "units" * 400}.items():

    @add("export", f"metadata structure {_name}")
    def _(ctx: Ctx, value=_value) -> Case:
        meta = {"prunekit.data": "digits", "prunekit.arch": EXAMPLE_ARCH}
        ckpt = ctx.safetensors("evil.safetensors", meta={**meta, "prunekit.structure": value})
        argv = ["export", ckpt, "--out", "m.onnx"]
        return Case(argv, expect="prunekit.structure", expect_any=("unstructured, units",))


# ------------------------------------------------------------------ security: recipes


def base_tree(ctx: Ctx, checkpoint: str | None = None, **extra) -> dict:
    """A valid, cheap recipe on a copy of the dense example in the case folder."""
    tree = resume_recipe_tree(Path(checkpoint or ctx.model()), steps=1, **extra)
    return tree


def recipe_argv(command: str, recipe: str = "recipe.yaml", *more) -> list:
    if command == "run":
        return ["run", recipe, "--out", "run", "--quiet", *more]
    return [command, recipe, *more]


for _command in ("validate", "explain", "run"):
    for _name in ("os.system", "module in cwd", "prunekit-internal importer"):

        @add(_command, f"checkpoint metadata arch {_name}")
        def _(ctx: Ctx, template=ARCH_PAYLOADS[_name], command=_command) -> Case:
            marker = plant(ctx)
            ckpt = evil_checkpoint(ctx, payload(template, marker))
            ctx.recipe(base_tree(ctx, checkpoint=ckpt))
            return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "model.arch os.system")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        weights = ctx.safetensors("weights.safetensors")  # no metadata: a plain state_dict
        arch = payload(ARCH_PAYLOADS["os.system"], marker)
        ctx.recipe(base_tree(ctx, checkpoint=weights, model={"arch": arch}))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "model.arch module in cwd")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        weights = ctx.safetensors("weights.safetensors")
        ctx.recipe(base_tree(ctx, checkpoint=weights, model={"arch": "evil:build"}))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "data module in cwd")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        ctx.recipe(base_tree(ctx, data="evil:data"))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "data call in cwd")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        ctx.recipe(base_tree(ctx, data="evilcall:data"))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "task.spec module in cwd")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        ctx.recipe(base_tree(ctx, task={"spec": "evil:task"}))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))

    @add(_command, "task.spec call in cwd")
    def _(ctx: Ctx, command=_command) -> Case:
        marker = plant(ctx)
        ctx.recipe(base_tree(ctx, task={"spec": "evilcall:task"}))
        return Case(recipe_argv(command), expect=TRUST, markers=(marker,))


@add("run", "data os.system")
def _(ctx: Ctx) -> Case:
    marker = plant(ctx)
    ctx.recipe(base_tree(ctx, data=payload(DATA_PAYLOADS["os.system"], marker)))
    return Case(recipe_argv("run"), expect=TRUST, markers=(marker,))


# ------------------------------------------------------------------ pickles


def reduce_pickle_torch(ctx: Ctx, name: str) -> tuple[str, Path]:
    marker = ctx.marker()
    torch.save({"weight": Reduce(f"touch {marker}")}, ctx.path(name))
    return name, marker


def reduce_pickle_raw(ctx: Ctx, name: str) -> tuple[str, Path]:
    marker = ctx.marker()
    ctx.write(name, pickle.dumps({"weight": Reduce(f"touch {marker}")}, protocol=2))
    return name, marker


@add("prune", "pickle full module")
def _(ctx: Ctx) -> Case:
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), ctx.path("module.pt"))
    return Case(["prune", "module.pt", *FAST, "--data", "digits"], expect=("--trust-pickle",))


@add("prune", "pickle __reduce__ os.system (torch.save)")
def _(ctx: Ctx) -> Case:
    name, marker = reduce_pickle_torch(ctx, "evil.pt")
    argv = ["prune", name, *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH]
    return Case(argv, expect=("--trust-pickle",), markers=(marker,))


@add("prune", "pickle __reduce__ os.system (raw pickle)")
def _(ctx: Ctx) -> Case:
    name, marker = reduce_pickle_raw(ctx, "evil.pth")
    argv = ["prune", name, *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH]
    return Case(argv, markers=(marker,))


@add("export", "pickle __reduce__ os.system")
def _(ctx: Ctx) -> Case:
    name, marker = reduce_pickle_torch(ctx, "evil.pt")
    argv = ["export", name, "--out", "m.onnx", "--data", "digits", "--arch", EXAMPLE_ARCH]
    return Case(argv, expect=("--trust-pickle",), markers=(marker,), max_lines=20)


@add("run", "checkpoint pickle __reduce__ os.system")
def _(ctx: Ctx) -> Case:
    name, marker = reduce_pickle_torch(ctx, "evil.pt")
    ctx.recipe(base_tree(ctx, checkpoint=name, model={"arch": EXAMPLE_ARCH}))
    return Case(recipe_argv("run"), expect=("--trust-pickle",), markers=(marker,))


# ------------------------------------------------------------------ YAML

BASE_YAML = """\
version: 1
seed: 0
data: digits
model:
  checkpoint: dense.safetensors
criterion:
  name: magnitude
schedule:
  final: 0.5
  steps: 1
finetune:
  epochs_per_step: 0
  final_epochs: 0
analysis:
  ntk: false
"""


def bad_yaml(ctx: Ctx, text, **case) -> Builder:
    """A builder: BASE_YAML-like recipe text, given whole (str/bytes), run by each command."""

    def build(command: str) -> Case:
        ctx.model()
        ctx.recipe(text)
        return Case(recipe_argv(command), **case)

    return build


def set_key(section: str | None, key: str, value) -> str:
    """BASE_YAML with one key (top level when ``section`` is None) set to ``value``."""
    tree = yaml.safe_load(BASE_YAML)
    if section is None:
        tree[key] = value
    else:
        tree.setdefault(section, {})[key] = value
    return yaml.safe_dump(tree, sort_keys=False)


def laughs_list() -> str:
    """A "billion laughs" of lists under `name` (9^9 strings by reference, ~400 bytes)."""
    rows = ['  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        rows.append(f"  - &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return BASE_YAML + "name:\n" + "\n".join(rows) + "\n"


def laughs_map() -> str:
    """The same with mappings (anything walking the node tree visits 9^9 nodes)."""
    rows = ["  a: &a {" + ", ".join(f"k{i}: lol" for i in range(9)) + "}"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        rows.append(f"  {cur}: &{cur} {{" + ", ".join(f"k{i}: *{prev}" for i in range(9)) + "}")
    return BASE_YAML + "name:\n" + "\n".join(rows) + "\n"


def python_tag(marker: Path) -> str:
    return BASE_YAML + f'name: !!python/object/apply:os.system ["touch {marker}"]\n'


YAML_TEXT: dict[str, Callable[[Ctx], tuple[str | bytes, dict]]] = {
    "python tag os.system": lambda c: (python_tag(c.marker()), {"markers": (c.marker(),)}),
    "python/object/new subprocess": lambda c: (
        BASE_YAML
        + "name: !!python/object/new:subprocess.check_call [[touch, "
        + f"{c.marker()}]]\n",
        {"markers": (c.marker(),)},
    ),
    "python/name tag": lambda c: (BASE_YAML + "name: !!python/name:os.system\n", {}),
    "binary tag": lambda c: (BASE_YAML + "name: !!binary aGVsbG8=\n", {}),
    "alias bomb (lists)": lambda c: (laughs_list(), {"timeout": 20, "max_seconds": 5}),
    "alias bomb (mappings)": lambda c: (laughs_map(), {"timeout": 20, "max_seconds": 5}),
    "deep nesting [": lambda c: (
        BASE_YAML + "name: " + "[" * 10000 + "]" * 10000 + "\n",
        {"timeout": 20, "max_seconds": 5},
    ),
    "deep nesting {": lambda c: (
        BASE_YAML + "name: " + "{a: " * 10000 + "1" + "}" * 10000 + "\n",
        {"timeout": 20, "max_seconds": 5},
    ),
    "deep block nesting": lambda c: (
        BASE_YAML + "name:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(300)),
        {"timeout": 20, "max_seconds": 5},
    ),
    "huge file (16 MB)": lambda c: (
        BASE_YAML + ("#" + "x" * 99 + "\n") * 160_000,
        {"timeout": 20, "max_seconds": 5},
    ),
    "non-UTF-8 bytes": lambda c: (BASE_YAML.encode() + b"name: caf\xe9 \xff\xfe\n", {}),
    "NUL byte": lambda c: (BASE_YAML + "name: a\x00b\n", {}),
    "empty file": lambda c: ("", {}),
    "list at top level": lambda c: ("- seed: 0\n- data: digits\n", {}),
    "scalar at top level": lambda c: ("just a string\n", {}),
    "unknown top-level key": lambda c: (BASE_YAML + "sede: 1\n", {}),
    "unknown nested key": lambda c: (set_key("schedule", "stpes", 3), {}),
    "unhashable key": lambda c: (BASE_YAML + "? [a, b]\n: 1\n", {}),
    "section not a mapping": lambda c: (set_key(None, "finetune", 5), {}),
    "steps is a string": lambda c: (set_key("schedule", "steps", "ten"), {}),
    "seed is a float": lambda c: (set_key(None, "seed", 1.5), {}),
    "include not strings": lambda c: (set_key("targets", "include", [1, 2]), {}),
    "seed -1": lambda c: (set_key(None, "seed", -1), {}),
    "seed 2**63": lambda c: (set_key(None, "seed", 2**63), {}),
    "schedule.steps 1e12": lambda c: (
        set_key("schedule", "steps", 10**12),
        {"timeout": 20, "max_seconds": 5},
    ),
    "schedule.final nan": lambda c: (set_key("schedule", "final", float("nan")), {}),
    "finetune.lr inf": lambda c: (set_key("finetune", "lr", float("inf")), {}),
    "criterion.lambda -inf": lambda c: (set_key("criterion", "lambda", float("-inf")), {}),
    "finetune.final_epochs 1e12": lambda c: (
        set_key("finetune", "final_epochs", 1.0e12),
        {"timeout": 20, "max_seconds": 5},
    ),
}
YAML_COMMANDS = {
    "validate": list(YAML_TEXT),
    "explain": [
        "python tag os.system", "alias bomb (mappings)", "deep nesting [", "non-UTF-8 bytes",
        "seed 2**63", "schedule.steps 1e12", "schedule.final nan", "list at top level",
    ],
    "run": [
        "python tag os.system", "alias bomb (lists)", "huge file (16 MB)", "non-UTF-8 bytes",
        "empty file", "seed -1", "seed 2**63", "schedule.steps 1e12", "finetune.lr inf",
        "finetune.final_epochs 1e12",
    ],
}  # fmt: skip

for _command, _names in YAML_COMMANDS.items():
    for _name in _names:

        @add(_command, f"yaml {_name}")
        def _(ctx: Ctx, name=_name, command=_command) -> Case:
            text, case = YAML_TEXT[name](ctx)
            return bad_yaml(ctx, text, **case)(command)


@add("run", "--set seed=-1")
def _(ctx: Ctx) -> Case:
    ctx.model()
    ctx.recipe(BASE_YAML)
    return Case(recipe_argv("run", "recipe.yaml", "--set", "seed=-1"))


@add("run", "--set without =")
def _(ctx: Ctx) -> Case:
    ctx.model()
    ctx.recipe(BASE_YAML)
    return Case(recipe_argv("run", "recipe.yaml", "--set", "schedule.steps"))


@add("explain", "--set schedule.steps=1e12")
def _(ctx: Ctx) -> Case:
    ctx.model()
    ctx.recipe(BASE_YAML)
    argv = recipe_argv("explain", "recipe.yaml", "--set", "schedule.steps=1000000000000")
    return Case(argv, timeout=20, max_seconds=5)


@add("validate", "missing recipe file")
def _(ctx: Ctx) -> Case:
    return Case(["validate", "nothere.yaml"])


@add("validate", "recipe is a directory")
def _(ctx: Ctx) -> Case:
    ctx.path("recipe.yaml").mkdir()
    return Case(["validate", "recipe.yaml"])


@add("validate", "recipe is a FIFO")
def _(ctx: Ctx) -> Case:
    os.mkfifo(ctx.path("recipe.yaml"))
    return Case(["validate", "recipe.yaml"], timeout=20, max_seconds=5)


@add("validate", "checkpoint missing")
def _(ctx: Ctx) -> Case:
    ctx.recipe(set_key("model", "checkpoint", "nothere.safetensors"))
    return Case(["validate", "recipe.yaml"])


@add("validate", "checkpoint is random bytes")
def _(ctx: Ctx) -> Case:
    ctx.write("dense.safetensors", os.urandom(4096))
    ctx.recipe(BASE_YAML)
    return Case(["validate", "recipe.yaml"])


@add("explain", "data file missing")
def _(ctx: Ctx) -> Case:
    ctx.model()
    ctx.recipe(set_key(None, "data", "nothere.npz"))
    return Case(["explain", "recipe.yaml"])


# ------------------------------------------------------------------ data


def digits_like(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)


def npz(ctx: Ctx, name: str = "data.npz", **arrays) -> str:
    np.savez(ctx.path(name), **arrays)
    return name


def data_case(make: Callable[[Ctx], str], command: str = "prune", **case) -> Builder:
    def build(ctx: Ctx) -> Case:
        ctx.model()
        spec = make(ctx)
        if command == "export":
            argv = ["export", "dense.safetensors", "--out", "m.onnx", "--data", spec]
            return Case(argv, max_lines=20, **case)
        return Case(["prune", "dense.safetensors", *FAST, "--data", spec], **case)

    return build


def _with(x=None, y=None, **more):
    """An .npz maker from digits-like arrays with some replaced."""

    def make(ctx: Ctx) -> str:
        x0, y0 = digits_like()
        arrays = {"x": x0 if x is None else x, "y": y0 if y is None else y, **more}
        return npz(ctx, **{k: v for k, v in arrays.items() if v is not False})

    return make


def _nan_x():
    x, _ = digits_like()
    x[3, 5] = np.nan
    return x


def _inf_x():
    x, _ = digits_like()
    x[7, 1] = -np.inf
    return x


def _object_payload(ctx: Ctx) -> str:
    x, y = digits_like()
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = Reduce(f"touch {ctx.marker()}"), 1
    np.savez(ctx.path("data.npz"), x=x, y=y, x_val=obj)  # pickled: allow_pickle on save
    return "data.npz"


def _object_x(ctx: Ctx) -> str:
    x, y = digits_like()
    obj = np.empty(len(x), dtype=object)
    for i in range(len(x)):
        obj[i] = Reduce(f"touch {ctx.marker()}")
    np.savez(ctx.path("data.npz"), x=obj, y=y)
    return "data.npz"


def _truncated_npz(ctx: Ctx) -> str:
    x, y = digits_like()
    npz(ctx, x=x, y=y)
    return ctx.write("data.npz", ctx.path("data.npz").read_bytes()[:300])


def _module_spec(source: str, func: str = "load"):
    def make(ctx: Ctx) -> str:
        ctx.module("mydata", source)
        return f"mydata:{func}"

    return make


DATA_CASES: dict[str, tuple] = {
    "npz x with NaN": (_with(x=_nan_x()), {}),
    "npz x with -Inf": (_with(x=_inf_x()), {}),
    "npz y with NaN": (_with(y=np.where(np.arange(60) == 4, np.nan, 1.0)), {}),
    "npz labels out of range": (_with(y=np.arange(60) % 13), {}),
    "npz negative labels": (_with(y=np.arange(60) % 10 - 1), {}),
    "npz label 2**40": (_with(y=np.where(np.arange(60) == 0, 2**40, 1)), {}),
    "npz float labels 0.5": (_with(y=np.full(60, 0.5)), {}),
    "npz string x": (_with(x=np.array([["a"] * 64] * 60)), {}),
    "npz string y": (_with(y=np.array(["cat"] * 60)), {}),
    "npz one row": (_with(x=digits_like(1)[0], y=np.array([3])), {}),
    "npz empty arrays": (_with(x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64)), {}),
    "npz x 1-D": (_with(x=np.arange(60, dtype=np.float32)), {}),
    "npz x_val shape differs": (
        _with(x_val=np.zeros((20, 32), np.float32), y_val=np.zeros(20, np.int64)),
        {},
    ),
    "npz y length differs": (_with(y=np.zeros(59, np.int64)), {}),
    "npz without x": (_with(x=False), {}),
    "npz object array with __reduce__ payload": (_object_payload, {"marker": True}),
    "npz object x with __reduce__ payload": (_object_x, {"marker": True}),
    "not an npz": (lambda c: c.write("data.npz", "x,y\n1,2\n"), {}),
    "npz truncated": (_truncated_npz, {}),
    "data function raises": (
        _module_spec("def load():\n    raise ValueError('boom: no data today')\n"),
        {},
    ),
    "data function wrong shape": (
        _module_spec(
            "import numpy as np\n\ndef load():\n    x = np.zeros((50, 3), np.float32)\n"
            "    y = np.zeros(50, np.int64)\n    return (x, y), (x, y)\n"
        ),
        {},
    ),
    "data function returns None": (_module_spec("def load():\n    return None\n"), {}),
    "data function returns 3 items": (
        _module_spec("def load():\n    return (1, 2, 3)\n"),
        {},
    ),
    "data function missing": (_module_spec("X = 1\n", func="nothere"), {}),
    "data function not callable": (_module_spec("X = 1\n", func="X"), {}),
    "synthetic?n=1000000000": (lambda c: "synthetic?n=1000000000", {"timeout": 30}),
    "synthetic?n=-5": (lambda c: "synthetic?n=-5", {}),
    "synthetic?bogus=1": (lambda c: "synthetic?bogus=1", {}),
    "synthetic?n=abc": (lambda c: "synthetic?n=abc", {}),
    "synthetic?dim=0": (lambda c: "synthetic?dim=0", {}),
    "synthetic?classes=1000000000": (lambda c: "synthetic?classes=1000000000", {"timeout": 30}),
    "unknown data spec": (lambda c: "imagenet", {}),
}

for _name, (_make, _opts) in DATA_CASES.items():

    @add("prune", f"data {_name}")
    def _(ctx: Ctx, make=_make, opts=_opts) -> Case:
        opts = dict(opts)
        markers = (ctx.marker(),) if opts.pop("marker", False) else ()
        return data_case(make, markers=markers, **opts)(ctx)


for _name in ("npz x with NaN", "npz object array with __reduce__ payload", "not an npz"):

    @add("export", f"data {_name}")
    def _(ctx: Ctx, name=_name) -> Case:
        make, opts = DATA_CASES[name]
        opts = dict(opts)
        markers = (ctx.marker(),) if opts.pop("marker", False) else ()
        return data_case(make, command="export", markers=markers, **opts)(ctx)


# ------------------------------------------------------------------ checkpoints


def _bytes_model(name: str, make: Callable[[Ctx], bytes]) -> Builder:
    def build(ctx: Ctx) -> Case:
        ctx.write(name, make(ctx))
        return Case(["prune", name, *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH])

    return build


def _weights(transform) -> Builder:
    def build(ctx: Ctx) -> Case:
        state = transform(ctx.dense_state())
        meta = {"prunekit.arch": EXAMPLE_ARCH, "prunekit.data": "digits"}
        ctx.safetensors("weird.safetensors", state, meta)
        return Case(["prune", "weird.safetensors", *FAST])

    return build


def _poke(name: str, index: int, value: float):
    def transform(state: dict) -> dict:
        state[name] = state[name].clone()
        state[name].view(-1)[index] = value
        return state

    return transform


def _header(length: int, body: bytes) -> bytes:
    return length.to_bytes(8, "little") + body


def _far_header() -> bytes:
    entry = {"dtype": "F32", "shape": [1000000, 1000], "data_offsets": [0, 4000000000]}
    head = json.dumps({"w": entry}).encode()
    return _header(len(head), head)


CHECKPOINT_CASES: dict[str, Builder] = {
    "missing file": lambda c: Case(["prune", "nothere.safetensors", *FAST]),
    "empty .safetensors": _bytes_model("empty.safetensors", lambda c: b""),
    "empty .pt": _bytes_model("empty.pt", lambda c: b""),
    "truncated safetensors": _bytes_model(
        "cut.safetensors", lambda c: c.assets.dense.read_bytes()[:30000]
    ),
    "truncated inside the header": _bytes_model(
        "cut.safetensors", lambda c: c.assets.dense.read_bytes()[:40]
    ),
    "random bytes .safetensors": _bytes_model("rand.safetensors", lambda c: os.urandom(5000)),
    "random bytes .pt": _bytes_model("rand.pt", lambda c: os.urandom(5000)),
    "header length 2**62": _bytes_model(
        "huge.safetensors", lambda c: _header(2**62, b'{"a": 1}')
    ),
    "header offsets outside the file": _bytes_model("bad.safetensors", lambda c: _far_header()),
    "header not JSON": _bytes_model("bad.safetensors", lambda c: _header(10, b"not json!!")),
    "NaN weights": _weights(_poke("1.weight", 17, float("nan"))),
    "Inf weights": _weights(_poke("3.weight", 5, float("inf"))),
    "-Inf bias": _weights(_poke("5.bias", 2, float("-inf"))),
    "state dict does not fit the arch": _weights(
        lambda s: {**s, "3.weight": s["3.weight"][:, :10]}
    ),
    "state dict with an extra key": _weights(lambda s: {**s, "9.weight": torch.zeros(2, 2)}),
    "state dict missing a key": _weights(lambda s: {k: v for k, v in s.items() if k != "1.bias"}),
    "wrong suffix (.onnx)": lambda c: Case(["prune", c.model("dense.onnx"), *FAST]),
    "wrong suffix (.txt)": lambda c: Case(["prune", c.model("dense.txt"), *FAST]),
    "a directory as model": lambda c: (
        c.path("model.safetensors").mkdir(),
        Case(["prune", "model.safetensors", *FAST, "--data", "digits"]),
    )[1],
    "a FIFO as model": lambda c: (
        os.mkfifo(c.path("model.pt")),
        Case(["prune", "model.pt", *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH],
             timeout=20, max_seconds=5),  # fmt: skip
    )[1],
    "a link to /dev/zero as model": lambda c: (
        os.symlink("/dev/zero", c.path("model.pt")),
        Case(["prune", "model.pt", *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH],
             timeout=20, max_seconds=5),  # fmt: skip
    )[1],
    "no arch metadata and no --arch": lambda c: Case(
        ["prune", c.safetensors("w.safetensors", meta={"prunekit.data": "digits"}), *FAST],
        expect=("--arch",),
    ),
    "metadata arch is not a spec": lambda c: Case(
        ["prune", evil_checkpoint(c, arch="a fine model"), *FAST]
    ),
    "metadata arch huge layer": lambda c: Case(
        ["prune", evil_checkpoint(c, arch="prunekit.models:mlp?sizes=64,1000000000,10"), *FAST],
        timeout=30,
    ),
    "metadata arch hostile activation": lambda c: Case(
        ["prune", evil_checkpoint(c, arch=f"{EXAMPLE_ARCH.split('&')[0]}&act=__import__"), *FAST]
    ),
    "a list of tensors (.pt)": lambda c: (
        torch.save([torch.zeros(3)], c.path("list.pt")),
        Case(["prune", "list.pt", *FAST, "--data", "digits", "--arch", EXAMPLE_ARCH]),
    )[1],
    "--arch that does not fit": lambda c: Case(
        ["prune", c.model(), *FAST, "--arch", "prunekit.models:mlp?sizes=64,10"]
    ),
}
for _name, _build in CHECKPOINT_CASES.items():
    add("prune", f"checkpoint {_name}")(_build)


# ------------------------------------------------------------------ CLI values

PRUNE_VALUES = {
    "--steps 1000000000000": (["--steps", "1000000000000"], {"timeout": 20, "max_seconds": 5}),
    "--steps 0": (["--steps", "0"], {}),
    "--steps -3": (["--steps", "-3"], {}),
    "--seed -1": (["--seed", "-1"], {}),
    "--seed 2**63": (["--seed", "9223372036854775808"], {}),
    "--seed 10**30": (["--seed", "1" + "0" * 30], {}),
    "--sparsity 1.5": (["--sparsity", "1.5"], {}),
    "--sparsity nan": (["--sparsity", "nan"], {}),
    "--sparsity -inf": (["--sparsity", "-inf"], {}),
    "--criterion nope": (["--criterion", "nope"], {}),
    "--fisher nope": (["--criterion", "obd", "--fisher", "nope"], {}),
    "--fisher-labels nope": (["--criterion", "obd", "--fisher-labels", "nope"], {}),
    "--schedule nope": (["--schedule", "nope"], {}),
    "--scope nope": (["--scope", "nope"], {}),
    "--optimizer nope": (["--optimizer", "nope"], {}),
    "--lr -1": (["--lr", "-1", "--finetune-epochs", "0.1"], {}),
    "--lr nan": (["--lr", "nan", "--finetune-epochs", "0.1"], {}),
    "--lr inf": (["--lr", "inf", "--finetune-epochs", "0.1"], {}),
    "--lambda nan": (["--lambda", "nan"], {}),
    "--batch-size 0": (["--batch-size", "0", "--finetune-epochs", "0.1"], {}),
    "--batch-size -1": (["--batch-size", "-1", "--finetune-epochs", "0.1"], {}),
    "--finetune-epochs nan": (["--finetune-epochs", "nan"], {}),
    "--final-epochs 1e12": (["--final-epochs", "1e12"], {"timeout": 20, "max_seconds": 5}),
    "--score-examples 0": (["--score-examples", "0"], {}),
    "--score-batch-size 0": (["--criterion", "obd", "--score-batch-size", "0"], {}),
    "--fisher-samples 0": (["--criterion", "obd", "--fisher-labels", "sampled",
                            "--fisher-samples", "0"], {}),  # fmt: skip
    "--refit-basis-every -1": (["--refit-basis-every", "-1"], {}),
    "--refit-basis-below 1.5": (["--refit-basis-below", "1.5"], {}),
    "--refit-basis-below nan": (["--refit-basis-below", "nan"], {}),
    "--ntk-every x0.5": (["--ntk", "--ntk-every", "x0.5"], {}),
    "--device tpu": (["--device", "tpu"], {}),
    "--steps not a number": (["--steps", "many"], {}),
}
for _name, (_extra, _opts) in PRUNE_VALUES.items():

    @add("prune", _name)
    def _(ctx: Ctx, extra=_extra, opts=_opts) -> Case:
        return Case(["prune", ctx.model(), *FAST, *extra], **opts)


@add("prune", "--out under a regular file")
def _(ctx: Ctx) -> Case:
    ctx.write("file.txt", "keep me\n")
    return Case(["prune", ctx.model(), *FAST, "--out", "file.txt/run"])


@add("prune", "--out is a regular file")
def _(ctx: Ctx) -> Case:
    ctx.write("file.txt", "keep me\n")
    return Case(["prune", ctx.model(), *FAST, "--out", "file.txt"])


@add("prune", "--out is the input's folder")
def _(ctx: Ctx) -> Case:
    ctx.model("run/model.safetensors")
    return Case(["prune", "run/model.safetensors", *FAST, "--out", "run", "--overwrite"])


@add("prune", "--export is the input")
def _(ctx: Ctx) -> Case:
    return Case(["prune", ctx.model(), *FAST, "--export", "dense.safetensors", "--overwrite"])


@add("prune", "--export under a regular file")
def _(ctx: Ctx) -> Case:
    ctx.write("file.txt", "keep me\n")
    return Case(["prune", ctx.model(), *FAST, "--export", "file.txt/m.onnx"])


@add("prune", "--export into a missing folder with a bad --dynamic-axis")
def _(ctx: Ctx) -> Case:
    argv = ["prune", ctx.model(), *FAST, "--export", "nothere/m.onnx", "--dynamic-axis", "x:1"]
    return Case(argv, expect=("--dynamic-axis x:1",))


# ------------------------------------------------------------------ export

EXPORT_ARGS = {
    "--opset 3": ["--opset", "3"],
    "--opset 99": ["--opset", "99"],
    "--opset -1": ["--opset", "-1"],
    "--storage nope": ["--storage", "nope"],
    "--quantize int4": ["--quantize", "int4"],
    "--quantize int8 with sparse storage": ["--quantize", "int8", "--storage", "sparse"],
    "--data nope": ["--data", "nope"],
    "--arch that does not fit": ["--arch", "prunekit.models:mlp?sizes=64,10"],
}
for _name, _extra in EXPORT_ARGS.items():

    @add("export", _name)
    def _(ctx: Ctx, extra=_extra) -> Case:
        return Case(["export", ctx.model(), "--out", "m.onnx", *extra], timeout=60, max_lines=20)


@add("export", "missing checkpoint")
def _(ctx: Ctx) -> Case:
    return Case(["export", "nothere.safetensors", "--out", "m.onnx"], max_lines=20)


@add("export", "no arch metadata and no --arch")
def _(ctx: Ctx) -> Case:
    ckpt = ctx.safetensors("w.safetensors", meta={"prunekit.data": "digits"})
    return Case(["export", ckpt, "--out", "m.onnx"], expect=("--arch",), max_lines=20)


@add("export", "truncated checkpoint")
def _(ctx: Ctx) -> Case:
    ctx.write("cut.safetensors", ctx.assets.dense.read_bytes()[:1000])
    return Case(["export", "cut.safetensors", "--out", "m.onnx"], max_lines=20)


@add("export", "NaN weights")
def _(ctx: Ctx) -> Case:
    state = _poke("1.weight", 0, float("nan"))(ctx.dense_state())
    meta = {"prunekit.arch": EXAMPLE_ARCH, "prunekit.data": "digits"}
    ckpt = ctx.safetensors("nan.safetensors", state, meta)
    return Case(["export", ckpt, "--out", "m.onnx"], timeout=60, max_lines=20)


@add("export", "--out under a regular file")
def _(ctx: Ctx) -> Case:
    ctx.write("file.txt", "keep me\n")
    return Case(["export", ctx.model(), "--out", "file.txt/m.onnx"], max_lines=20)


@add("export", "--out is the input")
def _(ctx: Ctx) -> Case:
    argv = ["export", ctx.model(), "--out", "dense.safetensors", "--overwrite"]
    return Case(argv, max_lines=20)


@add("export", "--out exists without --overwrite")
def _(ctx: Ctx) -> Case:
    ctx.write("m.onnx", b"keep me")
    return Case(["export", ctx.model(), "--out", "m.onnx"], max_lines=20)


@add("export", "m.onnx.json (its receipt) exists without --overwrite")
def _(ctx: Ctx) -> Case:
    ctx.write("m.onnx.json", "{}\n")
    return Case(["export", ctx.model(), "--out", "m.onnx"], max_lines=20)


@add("export", "--out into a missing folder with a bad --dynamic-axis")
def _(ctx: Ctx) -> Case:
    argv = ["export", ctx.model(), "--out", "nothere/m.onnx", "--dynamic-axis", "input:0"]
    return Case(argv, expect=("--dynamic-axis input:0",), max_lines=20)


# ------------------------------------------------------------------ plot


def fake_run(ctx: Ctx, metrics: bytes | str | None = None, ntk: str | None = None) -> str:
    """A run folder with the template run's files, metrics.jsonl replaced if given."""
    run = ctx.path("run")
    shutil.copytree(ctx.assets.resume_run, run, ignore=shutil.ignore_patterns("state"))
    if metrics is not None:
        ctx.write("run/metrics.jsonl", metrics)
    if ntk is not None:
        ctx.write("run/ntk.jsonl", ntk)
    return "run"


PLOT_CASES: dict[str, Builder] = {
    "folder that is not a run": lambda c: (c.path("run").mkdir(), Case(["plot", "run"]))[1],
    "missing folder": lambda c: Case(["plot", "nothere"]),
    "a regular file": lambda c: Case(["plot", c.write("run.txt", "hello\n")]),
    "metrics.jsonl malformed JSON": lambda c: Case(["plot", fake_run(c, '{"step": 0,\n')]),
    "metrics.jsonl wrong keys": lambda c: Case(
        ["plot", fake_run(c, '{"foo": 1}\n{"bar": 2}\n')]
    ),
    "metrics.jsonl wrong value types": lambda c: Case(
        ["plot", fake_run(c, '{"step": "zero", "sparsity": "half", "loss": [1]}\n')]
    ),
    "metrics.jsonl not UTF-8": lambda c: Case(
        ["plot", fake_run(c, b'{"step": 0, "loss": "\xff\xfe"}\n')]
    ),
    "metrics.jsonl arrays not objects": lambda c: Case(["plot", fake_run(c, "[1, 2]\n3\n")]),
    "metrics.jsonl empty": lambda c: Case(["plot", fake_run(c, "")]),
    "metrics.jsonl is a directory": lambda c: (
        fake_run(c),
        os.remove(c.path("run/metrics.jsonl")),
        c.path("run/metrics.jsonl").mkdir(),
        Case(["plot", "run"]),
    )[-1],
    "ntk.jsonl malformed": lambda c: Case(["plot", fake_run(c, ntk='{"step": 1, "phase"\n')]),
    "ntk.jsonl wrong keys": lambda c: Case(["plot", fake_run(c, ntk='{"nope": true}\n')]),
}
for _name, _build in PLOT_CASES.items():
    add("plot", _name)(_build)


# ------------------------------------------------------------------ example

EXAMPLE_CASES: dict[str, Builder] = {
    "unknown name": lambda c: Case(["example", "nope", "--out", "m.safetensors"]),
    "path-like name": lambda c: Case(["example", "../../mlp-digits", "--out", "m.safetensors"]),
    "--out without .safetensors": lambda c: Case(["example", "mlp-digits", "--out", "m.pt"]),
    "--out exists without --overwrite": lambda c: Case(
        ["example", "mlp-digits", "--out", c.write("m.safetensors", b"keep me")]
    ),
    "--out under a regular file": lambda c: Case(
        ["example", "mlp-digits", "--out", f"{c.write('file.txt', 'x')}/m.safetensors", "--quiet"],
        timeout=60, max_seconds=5,
    ),  # fmt: skip
    "--out is a directory (with --overwrite)": lambda c: (
        c.path("m.safetensors").mkdir(),
        Case(["example", "mlp-digits", "--out", "m.safetensors", "--overwrite", "--quiet"],
             timeout=60, max_seconds=5),  # fmt: skip
    )[1],
    "--seed -1": lambda c: Case(
        ["example", "mlp-digits", "--out", "m.safetensors", "--seed", "-1", "--quiet"],
        timeout=60, max_seconds=5,
    ),  # fmt: skip
    "--seed 2**63": lambda c: Case(
        ["example", "mlp-digits", "--out", "m.safetensors", "--seed", "9223372036854775808",
         "--quiet"], timeout=60, max_seconds=5,
    ),  # fmt: skip
}
for _name, _build in EXAMPLE_CASES.items():
    add("example", _name)(_build)


# ------------------------------------------------------------------ run --resume


def resume_case(corrupt: Callable[[Ctx, Path], None], **case) -> Builder:
    """A copy of the finished template run (state/ kept), corrupted; then run --resume."""

    def build(ctx: Ctx) -> Case:
        run = ctx.path("run")
        shutil.copytree(ctx.assets.resume_run, run)
        ctx.recipe(ctx.assets.resume_tree)
        corrupt(ctx, run / "state")
        argv = ["run", "recipe.yaml", "--out", "run", "--resume", "--quiet"]
        return Case(argv, **case)

    return build


def _latest(state: Path) -> dict:
    return json.loads((state / "latest.json").read_text())


def _step_file(state: Path) -> Path:
    return state / _latest(state)["tensors"]


def _edit_latest(**changes):
    def corrupt(ctx: Ctx, state: Path) -> None:
        info = _latest(state)
        for key, value in changes.items():
            if value is _DROP:
                info.pop(key)
            else:
                info[key] = value
        (state / "latest.json").write_text(json.dumps(info))

    return corrupt


_DROP = object()


def _point_outside(relative: bool):
    def corrupt(ctx: Ctx, state: Path) -> None:
        target = ctx.path("x.safetensors") if relative else ctx.outside / "abs.safetensors"
        shutil.copyfile(_step_file(state), target)  # a valid state file, outside the run
        _edit_latest(tensors="../../x.safetensors" if relative else str(target))(ctx, state)

    return corrupt


def _rewrite_step(make: Callable[[Path], bytes]):
    def corrupt(ctx: Ctx, state: Path) -> None:
        path = _step_file(state)
        path.write_bytes(make(path))

    return corrupt


def _foreign_keys(ctx: Ctx, state: Path) -> None:
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(_step_file(state)))


def _foreign_recipe(ctx: Ctx, state: Path) -> None:
    """State written by a run of another recipe (another seed and schedule)."""
    info = _latest(state)
    info["recipe"] = {**info["recipe"], "seed": 7}
    info["recipe"]["schedule"] = {**info["recipe"]["schedule"], "steps": 5}
    info["recipe_hash"] = "f" * 64
    (state / "latest.json").write_text(json.dumps(info))


LATEST = ("latest.json",)
STATE = ("state", "latest.json")
STEP = ("step-", ".safetensors")

RESUME_CASES: dict[str, Builder] = {
    "latest.json bad JSON": resume_case(
        lambda c, s: (s / "latest.json").write_text('{"step": 2, "tensors": '), expect=LATEST
    ),
    "latest.json not UTF-8": resume_case(
        lambda c, s: (s / "latest.json").write_bytes(b'{"step": "\xff\xfe"}'), expect=LATEST
    ),
    "latest.json empty": resume_case(
        lambda c, s: (s / "latest.json").write_text(""), expect=LATEST
    ),
    "latest.json a list": resume_case(
        lambda c, s: (s / "latest.json").write_text("[1, 2, 3]"), expect=LATEST
    ),
    "latest.json without tensors": resume_case(_edit_latest(tensors=_DROP), expect=LATEST),
    "latest.json tensors not a string": resume_case(_edit_latest(tensors=5), expect=LATEST),
    "tensors ../../x.safetensors": resume_case(
        _point_outside(relative=True), expect_any=("latest.json", "x.safetensors")
    ),
    "tensors absolute path": resume_case(
        _point_outside(relative=False), expect_any=("latest.json", "abs.safetensors")
    ),
    "tensors names a missing file": resume_case(
        _edit_latest(tensors="step-00042.safetensors"),
        expect_any=("latest.json", "step-00042.safetensors"),
    ),
    "step 'abc'": resume_case(_edit_latest(step="abc"), expect=LATEST),
    "step -1": resume_case(_edit_latest(step=-1), expect=LATEST),
    "step 999": resume_case(_edit_latest(step=999), expect=LATEST),
    "rows wrong type": resume_case(_edit_latest(rows="x"), expect=LATEST),
    "step file truncated": resume_case(
        _rewrite_step(lambda p: p.read_bytes()[: p.stat().st_size // 2]), expect=STEP
    ),
    "step file bad header": resume_case(
        _rewrite_step(lambda p: _header(2**40, b"{}")), expect=STEP
    ),
    "step file random bytes": resume_case(_rewrite_step(lambda p: os.urandom(3000)), expect=STEP),
    "step file wrong keys": resume_case(_foreign_keys, expect=STEP),
    "step file missing": resume_case(
        lambda c, s: _step_file(s).unlink(), expect_any=("latest.json", "step-")
    ),
    "state/ is a regular file": resume_case(
        lambda c, s: (shutil.rmtree(s), s.write_text("state\n")), expect_any=STATE
    ),
    "state/ missing (finished run)": resume_case(lambda c, s: shutil.rmtree(s), expect_any=STATE),
    "foreign state (another recipe)": resume_case(_foreign_recipe, expect_any=STATE),
}
for _name, _build in RESUME_CASES.items():
    add("run", f"--resume {_name}")(_build)


# ------------------------------------------------------------------ the tests


def _params(command: str):
    return pytest.mark.parametrize("name", list(CASES[command]), ids=list(CASES[command]))


@_params("prune")
def test_prune(name, ctx, server):
    run_case(ctx, CASES["prune"][name](ctx), server)


@_params("export")
def test_export(name, ctx, server):
    run_case(ctx, CASES["export"][name](ctx), server)


@_params("validate")
def test_validate(name, ctx, server):
    run_case(ctx, CASES["validate"][name](ctx), server)


@_params("explain")
def test_explain(name, ctx, server):
    run_case(ctx, CASES["explain"][name](ctx), server)


@_params("run")
def test_run(name, ctx, server):
    run_case(ctx, CASES["run"][name](ctx), server)


@_params("plot")
def test_plot(name, ctx, server):
    run_case(ctx, CASES["plot"][name](ctx), server)


@_params("example")
def test_example(name, ctx, server):
    run_case(ctx, CASES["example"][name](ctx), server)


FRESH = [
    ("prune", "metadata arch os.system"),
    ("validate", "checkpoint metadata arch module in cwd"),
    ("prune", "pickle __reduce__ os.system (torch.save)"),
]


@pytest.mark.parametrize(("command", "name"), FRESH, ids=[f"{c} {n}" for c, n in FRESH])
def test_hostile_files_in_a_fresh_interpreter(command, name, ctx, server):
    """Cross-check of the fork server: the console script itself, a new interpreter."""
    case = CASES[command][name](ctx)
    case.fresh = True
    case.timeout = max(case.timeout, 60)
    run_case(ctx, case, server)


# ------------------------------------------------------------------ payloads are live

LIVE_CHECK = """
import importlib, json, os, sys
from prunekit.checkpoint import parse_arch
for folder, spec in json.loads(sys.argv[1]):
    os.chdir(folder)
    sys.path.append(folder)
    for name in ("evil", "evilcall"):
        sys.modules.pop(name, None)
    try:
        module, func, kwargs = parse_arch(spec)
        getattr(importlib.import_module(module), func)(**kwargs)
    except BaseException as exc:
        print(spec, type(exc).__name__, exc)
    sys.path.remove(folder)
"""


def test_payloads_are_live(tmp_path, assets):
    """Each payload the hostile cases plant would create its marker if prunekit imported and
    called it the way it treats a spec; otherwise the marker checks would prove nothing."""
    import subprocess

    from .conftest import child_env

    specs = {f"arch {k}": v for k, v in ARCH_PAYLOADS.items() if k not in INERT_PAYLOADS}
    specs.update({f"data {k}": v for k, v in DATA_PAYLOADS.items() if k != "os.system"})
    jobs, markers = [], {}
    for i, (name, template) in enumerate(specs.items()):
        ctx = Ctx(tmp_path / str(i), assets)
        markers[name] = plant(ctx)
        jobs.append((str(ctx.dir), payload(template, markers[name])))
    ctx = Ctx(tmp_path / "pickle", assets)
    reduce_name, markers["pickle __reduce__"] = reduce_pickle_torch(ctx, "evil.pt")
    load = f"import torch; torch.load({str(ctx.path(reduce_name))!r}, weights_only=False)"
    proc = subprocess.run(
        [sys.executable, "-c", LIVE_CHECK + load, json.dumps(jobs)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dead = [name for name, marker in markers.items() if not marker.exists()]
    assert not dead, (dead, proc.stdout, proc.stderr[-2000:])


# ------------------------------------------------------------------ the flags work


def test_trust_code_lets_validate_import_a_recipe_module(ctx, server):
    """--trust-code is honoured: validate imports the module a recipe names (it writes a file
    when imported), and without the flag the same recipe is refused (in the case tables)."""
    imported = ctx.root / "IMPORTED"
    ctx.module(
        "benign",
        f"open({str(imported)!r}, 'w').close()\n\n"
        "def build(**kwargs):\n    from prunekit.models import mlp\n\n"
        "    return mlp(sizes='64,128,64,10', act='tanh')\n",
    )
    weights = ctx.safetensors("weights.safetensors")
    ctx.recipe(base_tree(ctx, checkpoint=weights, model={"arch": "benign:build"}))
    res = server.run(["validate", "recipe.yaml", "--trust-code"], ctx.dir)
    assert res.code == 0, res.describe()
    assert imported.exists(), "validate --trust-code did not import the recipe's module"
    assert "Traceback" not in res.stdout + res.stderr


def test_arch_typed_on_the_command_line_is_trusted_and_the_file_is_not(ctx, server):
    """--arch typed by the user replaces the payload in the metadata, which never runs."""
    marker = plant(ctx)
    ckpt = evil_checkpoint(ctx, payload(ARCH_PAYLOADS["os.system"], marker), data="evil:data")
    res = server.run(
        ["prune", ckpt, *FAST, "--arch", EXAMPLE_ARCH, "--data", "digits"], ctx.dir, timeout=120
    )
    assert not marker.exists(), "PAYLOAD RAN"
    assert res.code == 0, res.describe()
    assert (ctx.path("run") / "report.json").is_file()


def test_builtin_specs_need_no_flag(ctx, server):
    """A recipe naming only prunekit's own registries validates without --trust-code."""
    ctx.recipe(base_tree(ctx, data="synthetic?n=200&dim=64&classes=10"))
    res = server.run(["validate", "recipe.yaml"], ctx.dir)
    assert res.code == 0, res.describe()


# ------------------------------------------------------------------ slow: real processes


def _slow_recipe(ctx: Ctx, steps: int, criterion: str = "obd", epochs: float = 1) -> None:
    tree = base_tree(ctx, criterion={"name": criterion, "fisher": "diag", "score_examples": 500})
    if criterion == "magnitude":
        tree["criterion"] = {"name": "magnitude"}
    tree["schedule"] = {"final": 0.9, "steps": steps}
    tree["finetune"] = {"epochs_per_step": epochs, "final_epochs": epochs, "lr": 0.05}
    ctx.recipe(tree)


@pytest.mark.slow
def test_two_runs_into_one_folder_do_not_both_succeed(ctx):
    _slow_recipe(ctx, steps=3, criterion="magnitude", epochs=0.5)  # ~1 s of work: they overlap
    argv = ["run", "recipe.yaml", "--out", "run", "--quiet"]
    procs = [start_fresh(argv, ctx.dir), start_fresh(argv, ctx.dir)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = [p.returncode for p in procs]
    errs = "\n".join(f"--- {i}: {e[-800:]}" for i, (_, e) in enumerate(outs))
    detail = f"exit codes {codes}\n{errs}"
    for _, err in outs:
        assert "Traceback" not in err, detail
    assert sorted(codes) == [0, 2], detail
    loser = codes.index(2)
    winner_pid = procs[1 - loser].pid
    lines = outs[loser][1].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), detail
    assert str(winner_pid) in lines[0], f"no lock holder (pid {winner_pid}) named\n{detail}"
    assert (ctx.path("run") / "report.json").is_file(), detail


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_a_rerun_points_to_resume(ctx):
    steps = 40
    _slow_recipe(ctx, steps=steps)
    run = ctx.path("run")
    proc = start_fresh(["run", "recipe.yaml", "--out", "run", "--quiet"], ctx.dir)
    latest = partial_path(run) / "state" / "latest.json"  # `run` appears only when done
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert latest.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    step = json.loads(latest.read_text())["step"]
    assert step < steps, "the run finished before the interrupt; make it longer"
    pattern = r"(?:error: )?interrupted after step (\d+) of (\d+); resume with (.+)"
    match = re.fullmatch(pattern, lines[0])
    assert match, lines[0]
    assert (int(match[1]), int(match[2])) == (step, steps), lines[0]
    assert "--resume" in match[3], lines[0]

    before = tree_state(ctx.root)
    again = start_fresh(["run", "recipe.yaml", "--out", "run", "--quiet"], ctx.dir)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "--resume" in lines[0], lines[0]
    assert tree_diff(before, tree_state(ctx.root)) == []
