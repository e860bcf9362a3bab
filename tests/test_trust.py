"""Trust: a file never names code that prunekit runs, unless the user allows it.

Covers checkpoint metadata (prune, export), recipes (validate, explain, run), --set and
--arch/--data typed by the user, --trust-code, and the YAML/size limits of recipes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from prunekit.checkpoint import ARCH_KEY, load_model
from prunekit.errors import CheckpointError
from prunekit.models import mlp
from prunekit.prune.state import save_tensors
from prunekit.recipe_run import load_checked_recipe
from prunekit.trust import (
    TrustError,
    check_recipe_trust,
    is_builtin_arch,
    is_builtin_data,
    trusting_code,
)

ARCH = "prunekit.models:mlp?sizes=64,16,10&act=tanh"
BENIGN = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

from prunekit.models import mlp


def factory():
    return mlp("64,16,10", act="tanh")


def data():
    from prunekit.data import load_data
    return load_data("digits")
'''


@pytest.fixture
def cli(capsys):
    from prunekit.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def benign(tmp_path, monkeypatch):
    """A module 'pk_trust_payload' in a folder on sys.path; importing it writes a marker."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "pk_trust_payload.py").write_text(BENIGN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "pk_trust_payload", raising=False)
    return marker


def _checkpoint(path: Path, arch: str, data: str = "digits") -> Path:
    torch.manual_seed(0)
    return save_tensors(
        path, mlp("64,16,10", act="tanh").state_dict(), {ARCH_KEY: arch, "prunekit.data": data}
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("spec", "builtin"),
    [
        (ARCH, True),
        ("prunekit.models:cnn", True),
        ("prunekit.models:os", False),  # an attribute of the package, not a zoo factory
        ("prunekit.models:EXAMPLES", False),
        ("prunekit.models.zoo:mlp", False),
        ("prunekitx.models:mlp", False),
        ("os:system?command=touch%20x", False),
        ("builtins:exec", False),
        ("prunekit.models", False),
    ],
)
def test_builtin_arch_is_only_a_zoo_factory(spec, builtin):
    assert is_builtin_arch(spec) is builtin


@pytest.mark.parametrize(
    ("spec", "builtin"),
    [
        ("digits", True),
        ("mnist5k", True),
        ("synthetic?n=100&task=tokens", True),
        ("data/train.npz", True),
        ("os:system", False),
        ("evil.npz:load", False),
        ("mymod:data", False),
    ],
)
def test_builtin_data_is_bundled_synthetic_or_npz(spec, builtin):
    assert is_builtin_data(spec) is builtin


def test_metadata_arch_outside_prunekit_is_refused_before_import(tmp_path, benign):
    path = _checkpoint(tmp_path / "m.safetensors", "pk_trust_payload:factory")
    with pytest.raises(TrustError, match="--trust-code") as info:
        load_model(path)
    assert "--arch 'pk_trust_payload:factory'" in str(info.value)
    assert not benign.exists()
    with trusting_code():
        loaded = load_model(path)
    assert benign.exists() and loaded.arch == "pk_trust_payload:factory"


def test_typed_arch_is_trusted_as_typed(tmp_path, benign):
    path = _checkpoint(tmp_path / "m.safetensors", "os:system?command=false")
    loaded = load_model(path, arch="pk_trust_payload:factory")
    assert benign.exists() and loaded.arch == "pk_trust_payload:factory"


@pytest.mark.parametrize("command", ["prune", "export"])
def test_cli_refuses_a_payload_in_metadata(tmp_path, cli, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    payload = f"os:system?command=touch%20{marker}"
    path = _checkpoint(tmp_path / "m.safetensors", payload)
    args = ["--out", tmp_path / "run"] if command == "prune" else ["--out", tmp_path / "m.onnx"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(command, path, *args)
    line = _one_error_line(err)
    assert code == 2 and "--trust-code" in line and "--arch" in line and "os:system" in line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_refuses_a_data_function_in_metadata(tmp_path, cli, benign):
    path = _checkpoint(tmp_path / "m.safetensors", ARCH, data="pk_trust_payload:data")
    code, _, err = cli("export", path, "--out", tmp_path / "m.onnx")
    line = _one_error_line(err)
    assert code == 2 and "--data 'pk_trust_payload:data'" in line
    assert not benign.exists() and not (tmp_path / "m.onnx").exists()


def _recipe(tmp_path: Path, **sections) -> Path:
    tree = {"version": 1, "data": "digits", "model": {"example": "mlp-digits"}}
    tree.update(sections)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


RECIPE_PAYLOADS = {
    "data": {"data": "pk_trust_payload:data"},
    "model.arch": {
        "model": {"checkpoint": "m.safetensors", "arch": "pk_trust_payload:factory"}
    },
    "task.spec": {"task": {"spec": "pk_trust_payload:factory"}},
    "checkpoint metadata": {"model": {"checkpoint": "m.safetensors"}},
}


@pytest.mark.parametrize("command", ["validate", "explain", "run"])
@pytest.mark.parametrize("where", list(RECIPE_PAYLOADS))
def test_recipe_naming_outside_code_needs_trust_code(tmp_path, cli, benign, command, where):
    _checkpoint(tmp_path / "m.safetensors", "pk_trust_payload:factory")
    recipe = _recipe(tmp_path, **RECIPE_PAYLOADS[where])
    args = ["--out", tmp_path / "run"] if command == "run" else []
    code, out, err = cli(command, recipe, *args)
    line = _one_error_line(err)
    assert code == 2 and "--trust-code" in line and "pk_trust_payload" in line, line
    assert not benign.exists() and not (tmp_path / "run").exists() and out == ""


def test_validate_with_trust_code_imports_and_says_so(tmp_path, cli, benign):
    _checkpoint(tmp_path / "m.safetensors", ARCH)
    model = {"checkpoint": "m.safetensors", "arch": "pk_trust_payload:factory"}
    recipe = _recipe(tmp_path, model=model)
    code, out, err = cli("validate", recipe, "--trust-code")
    assert code == 0, err
    assert "--trust-code" in err and "pk_trust_payload:factory" in err
    assert "ok " in out and benign.exists()


def test_set_override_is_typed_so_trusted(tmp_path, cli, benign):
    recipe = _recipe(tmp_path)
    code, out, err = cli("explain", recipe, "--set", "data=pk_trust_payload:data")
    assert code == 0, err
    assert "timeline" in out


def test_shipped_recipes_need_no_flag(cli):
    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert len(recipes) >= 5

    for path in recipes:
        check_recipe_trust(load_checked_recipe(path), source=str(path))  # raises if refused


BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("alias bomb", BOMB, "aliases"),
        ("deep nesting", "[" * 10_000, "nesting deeper"),
        ("too large", "name: x\n" + "#" * 300_000, "at most"),
        ("seed negative", "seed: -1\n", "seed = -1"),
        ("seed too large", "seed: 9223372036854775808\n", "<= 9,223,372,036,854,775,807"),
        ("steps absurd", "schedule: {steps: 1000000000000}\n", "<= 10,000"),
        ("python tag", "seed: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_hostile_yaml_ends_fast_in_one_line(tmp_path, cli, name, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, _, err = cli("validate", path)
    elapsed = time.perf_counter() - start
    line = _one_error_line(err)
    assert code == 2 and expected in line, line
    assert elapsed < 5.0, f"{name} took {elapsed:.1f} s"  # a loose guard against expansion


def test_non_utf8_recipe_names_the_byte(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    code, _, err = cli("explain", path)
    assert code == 2 and "not UTF-8" in _one_error_line(err) and "0xe9" in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--seed", "-1", "--seed -1 must be an integer >= 0"),
        ("--seed", str(2**63), "<= 9,223,372,036,854,775,807"),
        ("--steps", str(10**12), "<= 10,000"),
        ("--final-epochs", "1e9", "<= 10,000"),
        ("--score-examples", str(10**9), "<= 10,000,000"),
        ("--fisher-samples", "100000", "<= 1,024"),
    ],
)
def test_absurd_cli_sizes_are_refused_before_loading(tmp_path, cli, option, value, expected):
    missing = tmp_path / "does-not-exist.safetensors"  # bounds come before the model load
    code, _, err = cli("prune", missing, option, value, "--out", tmp_path / "run")
    line = _one_error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    state = mlp("64,16,10", act="tanh").state_dict()
    state["3.weight"][2, 5] = bad
    path = save_tensors(tmp_path / "m.safetensors", state, {ARCH_KEY: ARCH})
    with pytest.raises(CheckpointError, match=r"'3\.weight' holds 1 non-finite"):
        load_model(path)


def test_interrupt_line_names_the_step_and_the_resume_command():
    from prunekit.cli_common import interrupted_line, tracked_run
    from prunekit.console import BarProgress

    bars = BarProgress(enabled=False)
    with tracked_run(bars, "prunekit run r.yaml --out runs/r --resume"):
        assert interrupted_line().startswith("interrupted before the first pruning step")
        bars("score", 3, 5)
        bars("steps", 3, 5)
        assert interrupted_line() == (
            "interrupted after step 3 of 5; resume with prunekit run r.yaml --out runs/r --resume"
        )
    with tracked_run(bars, None):
        assert interrupted_line().endswith("nothing was written")
