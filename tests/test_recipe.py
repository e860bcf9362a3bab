"""Recipes: each kind of schema mistake, --set overrides, explain's timeline, gates, exit codes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import prunekit.checkpoint as checkpoint_mod
import prunekit.data as data_mod
import prunekit.recipe_run as pipeline_mod
from prunekit.checkpoint import build_model, load_model
from prunekit.data import load_data
from prunekit.errors import PrunekitError, SettingError
from prunekit.models import EXAMPLES
from prunekit.recipe import (
    SCHEMA,
    RecipeError,
    changed_keys,
    evaluate_checks,
    load_recipe,
    recipe_hash,
)
from prunekit.recipe_run import explain_recipe, validate_recipe

FIXTURE_WEIGHTS = {"1.weight": 64 * 32, "3.weight": 32 * 10}  # conftest's 64-32-10 MLP


def base_tree(ckpt: Path) -> dict:
    """A tiny, fast recipe on conftest's trained digits MLP (2 steps, short fine-tunes)."""
    return {
        "version": 1,
        "name": "tiny",
        "seed": 0,
        "data": "digits",
        "model": {"checkpoint": str(ckpt)},
        "criterion": {"name": "obd", "fisher": "ekfac", "labels": "sampled", "score_examples": 200},
        "schedule": {"final": 0.9, "steps": 2, "kind": "exp"},
        "finetune": {"lr": 0.05, "batch_size": 50, "epochs_per_step": 0.3, "final_epochs": 0.5},
        "analysis": {"ntk": False},
    }


def dump(tree: dict) -> str:
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def write(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else dump(content))
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def base(digits_model_file) -> dict:
    return base_tree(digits_model_file)


# ------------------------------------------------------------------ schema mistakes

SCHEMA_CASES = {
    # name: (mutate tree, needle locating the line or None, substrings of the message)
    "unknown top-level key": (
        lambda t: t.update(critrion={"name": "obd"}),
        "critrion:",
        ["'critrion'", *SCHEMA],
    ),
    "unknown nested key": (
        lambda t: t["criterion"].update(lamda=0.1),
        "  lamda:",
        ["criterion.lamda", "known keys of criterion", *SCHEMA["criterion"]],
    ),
    "steps is a string": (
        lambda t: t["schedule"].update(steps="ten"),
        "  steps:",
        ["schedule.steps", "'ten'", "integer"],
    ),
    "steps is a bool": (
        lambda t: t["schedule"].update(steps=True),
        "  steps:",
        ["schedule.steps", "True", "integer"],
    ),
    "lambda is a list": (
        lambda t: t["criterion"].update({"lambda": [1]}),
        "  lambda:",
        ["criterion.lambda", "[1]", "number"],
    ),
    "ntk is a string": (
        lambda t: t["analysis"].update(ntk="yes"),
        "  ntk:",
        ["analysis.ntk", "'yes'", "true/false"],
    ),
    "final is nan": (
        lambda t: t["schedule"].update(final=math.nan),
        "  final:",
        ["schedule.final", "nan"],
    ),
    "seed is a float": (lambda t: t.update(seed=1.5), "seed:", ["seed", "1.5", "integer"]),
    "section is not a mapping": (
        lambda t: t.update(schedule=5),
        "schedule:",
        ["schedule must be a mapping", "final", "steps", "kind"],
    ),
    "include is not a list of strings": (
        lambda t: t.update(targets={"include": [1]}),
        "  include:",
        ["targets.include", "list of strings"],
    ),
    "model has both example and checkpoint": (
        lambda t: t["model"].update(example="mlp-digits"),
        None,
        ["model.example", "model.checkpoint", "exactly one"],
    ),
    "model has neither example nor checkpoint": (
        lambda t: t.update(model={"arch": None}),
        None,
        ["model.example", "model.checkpoint", "exactly one"],
    ),
    "export checks without export.enabled": (
        lambda t: t.update(checks={"max_export_ratio": 0.2, "export_parity": True}),
        None,
        ["max_export_ratio", "export_parity", "export.enabled"],
    ),
}

TEXT_CASES = {
    "not YAML": ("schedule: [1, 2\nseed: 0\n", ["not valid YAML"]),
    "not a mapping": ("- schedule\n- seed\n", ["must be a mapping"]),
    "empty file": ("", ["exactly one"]),
}


def schema_case(tmp_path: Path, base: dict, name: str) -> tuple[Path, list[str]]:
    """(recipe path, substrings the RecipeError must contain) of case ``name``."""
    if name == "missing recipe file":
        return tmp_path / "nope.yaml", ["nope.yaml", "does not exist"]
    if name in TEXT_CASES:
        text, wanted = TEXT_CASES[name]
        return write(tmp_path / "recipe.yaml", text), wanted
    mutate, needle, wanted = SCHEMA_CASES[name]
    tree = copy.deepcopy(base)
    mutate(tree)
    path = write(tmp_path / "recipe.yaml", tree)
    if needle is not None:
        wanted = [*wanted, f"recipe.yaml:{line_of(path.read_text(), needle)}:"]
    return path, wanted


ALL_SCHEMA = [*SCHEMA_CASES, *TEXT_CASES, "missing recipe file"]


@pytest.mark.parametrize("name", ALL_SCHEMA)
def test_schema_mistake_is_a_recipe_error_naming_it(tmp_path, base, name):
    path, wanted = schema_case(tmp_path, base, name)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    for part in wanted:
        assert part in message, (part, message)


def test_line_numbers_point_at_the_offending_key(tmp_path, base):
    text = dump(base) + "checks:\n  min_sparsity: 0.5\n  max_acuracy_drop: 1\n"
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError, match=r"r\.yaml:(\d+): unknown key checks\.max_acuracy_drop"):
        load_recipe(path)
    line = len(text.splitlines())  # the very last line
    with pytest.raises(RecipeError, match=f"r.yaml:{line}:"):
        load_recipe(path)


def test_valid_recipe_resolves_every_default(tmp_path, base):
    recipe = load_recipe(write(tmp_path / "r.yaml", base))
    assert set(recipe) == set(SCHEMA)
    for section, spec in SCHEMA.items():
        if isinstance(spec, dict):
            assert set(recipe[section]) == set(spec), section
    assert recipe["finetune"]["momentum"] == SCHEMA["finetune"]["momentum"].default
    assert recipe["schedule"]["final"] == 0.9 and recipe["criterion"]["fisher"] == "ekfac"


def test_relative_checkpoint_resolves_against_the_recipe_folder(tmp_path, base, digits_model_file):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "dense.safetensors").write_bytes(digits_model_file.read_bytes())
    base["model"]["checkpoint"] = "../dense.safetensors"
    recipe = load_recipe(write(sub / "r.yaml", base))
    assert Path(recipe["model"]["checkpoint"]) == (tmp_path / "dense.safetensors").resolve()


IMPOSSIBLE = {
    # name: (section, key, value, substrings)
    "final 1.0": ("schedule", "final", 1.0, ["1.0", "[0, 1)"]),
    "final -0.1": ("schedule", "final", -0.1, ["-0.1", "[0, 1)"]),
    "steps 0": ("schedule", "steps", 0, ["steps = 0", ">= 1"]),
    "criterion foo": ("criterion", "name", "foo", ["'foo'", "auto, lm, magnitude, obd, obs, qm"]),
    "criterion code": ("criterion", "name", "os:system", ["'os:system'", "auto, lm, magnitude"]),
    "scope diagonal": ("criterion", "scope", "diagonal", ["'diagonal'", "global, layer"]),
    "schedule quad": ("schedule", "kind", "quad", ["'quad'", "cubic, exp, linear"]),
    "fisher dense": ("criterion", "fisher", "dense", ["'dense'", "diag, ekfac, kfac"]),
    "update code": ("criterion", "update", "os:system", ["'os:system'", "auto", "rows"]),
    "refit below code": ("criterion", "refit_basis_below", "os:system", ["'os:system'", "number"]),
    "refit below 1": ("criterion", "refit_basis_below", 1.0, ["refit_basis_below", "[0, 1)"]),
    "shots -1": ("criterion", "shots", -1, ["shots", "-1", ">= 0"]),
    "lr negative": ("finetune", "lr", -1.0, ["-1.0"]),
    "optimizer adam": ("finetune", "optimizer", "adam", ["'adam'", "adamw, sgd"]),
    "include matches nothing": ("targets", "include", ["nomatch*"], ["nomatch*"]),
    "checkpoint missing": ("model", "checkpoint", "/nonexistent/x.safetensors", ["x.safetensors"]),
}


def impossible_case(tmp_path: Path, base: dict, name: str) -> tuple[Path, list[str]]:
    section, key, value, wanted = IMPOSSIBLE[name]
    tree = copy.deepcopy(base)
    tree.setdefault(section, {})[key] = value
    return write(tmp_path / "recipe.yaml", tree), wanted


@pytest.mark.parametrize("name", IMPOSSIBLE)
def test_impossible_value_is_rejected_by_validate_naming_it(tmp_path, base, name):
    path, wanted = impossible_case(tmp_path, base, name)
    with pytest.raises(PrunekitError) as info:
        validate_recipe(load_recipe(path))
    for part in wanted:
        assert part in str(info.value), (part, str(info.value))


@pytest.mark.parametrize(
    "name", ["final 1.0", "steps 0", "criterion foo", "scope diagonal", "update code"]
)
def test_impossible_value_is_a_recipe_error_with_key_and_line(tmp_path, base, name):
    path, _ = impossible_case(tmp_path, base, name)
    section, key, _, _ = IMPOSSIBLE[name]
    with pytest.raises(RecipeError) as info:
        pipeline_mod.load_checked_recipe(path)  # registry names come from the pipeline
    line = line_of(path.read_text(), f"  {key}:")
    assert f"{section}.{key}" in str(info.value) and f"recipe.yaml:{line}:" in str(info.value)


def cli_bad_recipe(cli, tmp_path, monkeypatch, command: str, path: Path, wanted: list[str]):
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    args = [command, path] + (["--out", tmp_path / "out", "--quiet"] if command == "run" else [])
    code, stdout, stderr = cli(*args)
    assert code == 2, (code, stdout, stderr)
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for part in wanted:
        assert part in stderr, (part, stderr)
    assert "Traceback" not in stderr and stdout == ""
    assert files_under(tmp_path) == before  # nothing written (no out dir, no runs/)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("name", ALL_SCHEMA)
def test_cli_schema_mistake_exit_2_one_line(cli, tmp_path, monkeypatch, base, command, name):
    path, wanted = schema_case(tmp_path, base, name)
    cli_bad_recipe(cli, tmp_path, monkeypatch, command, path, wanted)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("name", IMPOSSIBLE)
def test_cli_impossible_value_exit_2_one_line(cli, tmp_path, monkeypatch, base, command, name):
    path, wanted = impossible_case(tmp_path, base, name)
    cli_bad_recipe(cli, tmp_path, monkeypatch, command, path, wanted)


def test_run_validates_before_training_the_example(cli, tmp_path, monkeypatch, base):
    calls = []

    def fake_train(*args, **kwargs):
        calls.append(args)
        raise SettingError("training started")

    monkeypatch.setattr(pipeline_mod, "train_example", fake_train)
    base["model"] = {"example": "mlp-digits"}
    base["schedule"]["final"] = 1.0
    code, _, stderr = cli("run", write(tmp_path / "r.yaml", base), "--out", tmp_path / "o")
    assert calls == []  # rejected before any training
    assert code == 2 and "1.0" in stderr


RUN_ONLY = {
    "final_epochs -1": ("finetune", "final_epochs", -1.0),
    "batch_size 0": ("finetune", "batch_size", 0),
    "score_examples 0": ("criterion", "score_examples", 0),
    "samples 0": ("criterion", "samples", 0),
    "ntk_every zz": ("analysis", "ntk_every", "zz"),
}


def _run_only_recipe(tmp_path: Path, base: dict, name: str) -> Path:
    section, key, value = RUN_ONLY[name]
    base = copy.deepcopy(base)
    base[section][key] = value
    if key == "ntk_every":
        base["analysis"]["ntk"] = True
    return write(tmp_path / "r.yaml", base)


@pytest.mark.parametrize("name", RUN_ONLY)
def test_run_rejects_values_that_cannot_run(cli, tmp_path, base, name):
    path = _run_only_recipe(tmp_path, base, name)
    code, _, stderr = cli("run", path, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and stderr.startswith("error: "), stderr
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("name", RUN_ONLY)
def test_validate_rejects_what_run_rejects(tmp_path, base, name):
    with pytest.raises(PrunekitError):
        validate_recipe(load_recipe(_run_only_recipe(tmp_path, base, name)))


def test_negative_seed_is_a_user_error(cli, tmp_path, base):
    base["seed"] = -1
    path = write(tmp_path / "r.yaml", base)
    code, _, stderr = cli("run", path, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "seed" in stderr


def test_unknown_recipe_version_is_rejected(tmp_path, base):
    base["version"] = 2
    with pytest.raises(RecipeError, match="version"):
        load_recipe(write(tmp_path / "r.yaml", base))


def test_exponent_floats_without_a_dot_are_numbers(tmp_path, base):
    text = dump(base).replace("lr: 0.05", "lr: 1e-3")
    assert "lr: 1e-3" in text
    assert load_recipe(write(tmp_path / "r.yaml", text))["finetune"]["lr"] == 1e-3
    assert load_recipe(tmp_path / "r.yaml", ["finetune.weight_decay=5e-4"])["finetune"][
        "weight_decay"
    ] == pytest.approx(5e-4)


# ------------------------------------------------------------------ --set overrides


def test_set_overrides_apply_and_change_the_hash(tmp_path, base):
    path = write(tmp_path / "r.yaml", base)
    plain = load_recipe(path)
    over = load_recipe(path, ["schedule.final=0.8"])
    assert plain["schedule"]["final"] == 0.9 and over["schedule"]["final"] == 0.8
    assert changed_keys(plain, over) == ["schedule.final"]
    assert recipe_hash(plain) != recipe_hash(over)
    assert recipe_hash(plain) == recipe_hash(load_recipe(path))
    assert validate_recipe(over)["steps"][-1] == 0.8
    assert validate_recipe(plain)["steps"][-1] == 0.9
    # later overrides win; top-level keys and absent sections work
    many = load_recipe(
        path, ["schedule.steps=3", "schedule.steps=5", "seed=7", "checks.min_sparsity=0.5"]
    )
    assert many["schedule"]["steps"] == 5 and many["seed"] == 7
    assert many["checks"]["min_sparsity"] == 0.5
    assert set(changed_keys(plain, many)) == {"schedule.steps", "seed", "checks.min_sparsity"}
    assert load_recipe(path, ["criterion.fisher=null"])["criterion"]["fisher"] is None


@pytest.mark.parametrize(
    "item, wanted",
    [
        ("schedule.steps=abc", ["schedule.steps", "'abc'", "integer"]),
        ("schedule.steps=2.5", ["schedule.steps", "2.5", "integer"]),
        ("schedule.steps=true", ["schedule.steps", "True", "integer"]),
        ("schedule.final=abc", ["schedule.final", "'abc'", "number"]),
        ("analysis.ntk=maybe", ["analysis.ntk", "'maybe'", "true/false"]),
        ("criterion.lambda=[1]", ["criterion.lambda", "number"]),
        ("seed=x", ["seed", "'x'", "integer"]),
    ],
)
def test_set_values_are_type_checked(tmp_path, base, item, wanted):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", base), [item])
    for part in [*wanted, "--set"]:
        assert part in str(info.value), (part, str(info.value))


@pytest.mark.parametrize(
    "item, named", [("criterion.lamda=1", "criterion.lamda"), ("foo=1", "foo"),
                    ("schedule=1", "schedule"), ("schedule.final.x=1", "schedule.final.x")]
)  # fmt: skip
def test_set_unknown_key_lists_the_known_ones(tmp_path, base, item, named):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", base), [item])
    message = str(info.value)
    assert f"'{named}'" in message and "unknown key" in message
    for known in ("criterion.lambda", "schedule.final", "seed", "checks.min_sparsity"):
        assert known in message


@pytest.mark.parametrize("item", ["foo", "schedule.final", "=0.8", "schedule.=0.8", ".final=1"])
def test_set_malformed_is_rejected(tmp_path, base, item):
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(write(tmp_path / "r.yaml", base), [item])


@pytest.mark.parametrize("command", ["run", "explain"])
def test_cli_set_errors_exit_2(cli, tmp_path, monkeypatch, base, command):
    path = write(tmp_path / "r.yaml", base)
    monkeypatch.chdir(tmp_path)
    for item, part in (("schedule.steps=abc", "schedule.steps"), ("foo", "section.key=value"),
                       ("criterion.lamda=1", "criterion.lambda")):  # fmt: skip
        args = [command, path, "--set", item] + (["--quiet"] if command == "run" else [])
        code, stdout, stderr = cli(*args)
        assert code == 2 and stdout == "", (item, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and part in stderr
    assert files_under(tmp_path) == {"r.yaml"}


# ------------------------------------------------------------------ explain and validate

FORMULAS = {
    "exp": lambda s, k, n: 1 - (1 - s) ** (k / n),
    "linear": lambda s, k, n: s * k / n,
    "cubic": lambda s, k, n: s * (1 - (1 - k / n) ** 3),
}


@pytest.fixture(scope="module")
def n_train() -> int:
    return len(load_data("digits", seed=0).x_train)


@pytest.mark.parametrize("kind", FORMULAS)
@pytest.mark.parametrize("final, steps", [(0.9, 4), (0.75, 7)])
def test_explain_timeline_matches_the_schedule_formula(tmp_path, base, n_train, kind, final, steps):
    base["schedule"] = {"final": final, "steps": steps, "kind": kind}
    base["finetune"].update(epochs_per_step=0.5, final_epochs=3)
    plan = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    total = sum(FIXTURE_WEIGHTS.values())
    assert plan["targets"] == FIXTURE_WEIGHTS
    assert [r["step"] for r in plan["rows"]] == list(range(1, steps + 1))
    for k, row in enumerate(plan["rows"], start=1):
        s = FORMULAS[kind](final, k, steps)
        assert row["sparsity"] == pytest.approx(s, abs=1e-12), (kind, k)
        assert row["kept"] == total - round(s * total), (kind, k)
        assert row["finetune_epochs"] == 0.5
        assert row["finetune_forward"] == row["finetune_backward"] == 0.5 * n_train
        assert row["per_layer"] is None  # global scope: unknown before scoring
    assert plan["rows"][-1]["sparsity"] == final  # exact end point
    assert plan["totals"]["finetune_forward"] == steps * 0.5 * n_train + 3 * n_train
    assert plan["totals"]["score_forward"] == sum(r["score_forward"] for r in plan["rows"])
    assert all(r["kept"] > plan["rows"][-1]["kept"] for r in plan["rows"][:-1])


def test_explain_layer_scope_and_scoring_passes(tmp_path, base):
    base["criterion"].update(scope="layer", score_examples=100)
    small = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    for row in small["rows"]:
        assert row["per_layer"] == row["sparsity"]
    base["criterion"]["score_examples"] = 200
    big = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    for a, b in zip(small["rows"], big["rows"], strict=True):
        assert b["score_forward"] == 2 * a["score_forward"] > 0
        assert b["score_backward"] == 2 * a["score_backward"] > 0
    base["criterion"] = {"name": "magnitude"}
    mag = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    assert all(r["score_forward"] == r["score_backward"] == 0 for r in mag["rows"])


@pytest.fixture
def meta_only(monkeypatch):
    """Records every model validate/explain builds; forbids training, data and weight loading."""
    built = []
    real_build = checkpoint_mod.build_model

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(model)
        return model

    def forbidden(*args, **kwargs):
        raise AssertionError("validate must not train, load data or read weights")

    monkeypatch.setattr(checkpoint_mod, "build_model", recording_build)
    monkeypatch.setattr(checkpoint_mod, "load_model", forbidden)
    monkeypatch.setattr(data_mod, "load_data", forbidden)
    monkeypatch.setattr(pipeline_mod, "train_example", forbidden)
    return built


def test_validate_resolves_targets_on_the_meta_device_example(tmp_path, base, meta_only):
    base["model"] = {"example": "mlp-digits"}
    checked = validate_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    assert len(meta_only) == 1
    params = list(meta_only[0].parameters())
    assert params and all(p.device.type == "meta" for p in params)
    real = build_model(EXAMPLES["mlp-digits"].arch)
    want = {n: p.numel() for n, p in real.named_parameters() if n.endswith("weight")}
    assert checked["targets"] == want and sum(want.values()) == 17024
    assert checked["steps"][-1] == 0.9 and len(checked["steps"]) == 2


def test_validate_resolves_targets_from_checkpoint_metadata(tmp_path, base, meta_only):
    checked = validate_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    assert all(p.device.type == "meta" for m in meta_only for p in m.parameters())
    assert len(meta_only) == 1 and checked["targets"] == FIXTURE_WEIGHTS


def test_validate_target_counts_equal_the_real_model(tmp_path, base, digits_model_file):
    base["targets"] = {"exclude": ["3.*"]}
    checked = validate_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    real = load_model(digits_model_file).model
    assert checked["targets"] == {"1.weight": real[1].weight.numel()}


def test_cli_validate_and_explain_print_the_plan(cli, tmp_path, base):
    path = write(tmp_path / "r.yaml", base)
    code, stdout, stderr = cli("validate", path, path)
    assert code == 0, stderr
    flat = " ".join(stdout.split())  # rich wraps long lines
    assert flat.count("ok ") == 2 and "2 steps, 2 targets, 2,368 weights" in flat
    code, stdout, stderr = cli("explain", path, "--set", "schedule.steps=3")
    assert code == 0, stderr
    plan = explain_recipe(load_recipe(path, ["schedule.steps=3"]))
    for row in plan["rows"]:
        assert f"{row['sparsity']:.4f}" in stdout and str(row["kept"]) in stdout
    assert "0.9000" in stdout and "total example-passes" in stdout
    bad = write(tmp_path / "bad.yaml", dump({**base, "seeed": 1}))
    code, stdout, stderr = cli("validate", path, bad)
    assert code == 2 and "ok " in stdout and "seeed" in stderr


# ------------------------------------------------------------------ gates

REPORT = {
    "sparsity": {"global": 0.9},
    "params": {"prunable": 1000, "zeros": 900},
    "metrics": {
        "dense": {"loss": 0.20, "accuracy": 0.95},
        "pruned": {"loss": 0.90, "accuracy": 0.60},
        "finetuned": {"loss": 0.25, "accuracy": 0.93},
    },
}


def receipt(storage: str = "packed", diff: float = 1e-7, ratio: float = 0.26) -> dict:
    """A receipt shaped like export_onnx's (bytes, verification, latency)."""
    lat = {f"onnxruntime_{storage}": {"batch1": {"p50_ms": 0.5}, "batch64": {"p50_ms": 3.0}}}
    if storage != "dense":
        lat["onnxruntime_dense"] = {"batch1": {"p50_ms": 0.4}, "batch64": {"p50_ms": 2.0}}
    lat["pytorch"] = {"batch1": {"p50_ms": 9.0}, "batch64": {"p50_ms": 50.0}}
    return {
        "storage": storage,
        "bytes": {"file": 2531, "dense_fp32": 9640, "ratio": ratio},
        "verification": {"max_abs_diff": diff, "tolerance": 1e-5},
        "latency": lat,
    }


def one(checks: dict, report=REPORT, rec=None) -> dict:
    rows = evaluate_checks(checks, report, rec)
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize(
    "check, limit, value, passed",
    [
        ("min_sparsity", 0.9, 0.9, True),
        ("min_sparsity", 0.85, 0.9, True),
        ("min_sparsity", 0.95, 0.9, False),
        ("max_accuracy_drop", 2.5, 2.0, True),  # points: 95% -> 93% is 2 points
        ("max_accuracy_drop", 1.5, 2.0, False),
        ("max_accuracy_drop", 0.03, 2.0, False),  # a fraction is not points
        ("max_loss_increase", 0.1, 0.05, True),
        ("max_loss_increase", 0.01, 0.05, False),
    ],
)
def test_evaluate_checks_model_gates(check, limit, value, passed):
    row = one({check: limit})
    assert row["check"] == check and row["limit"] == limit
    assert row["value"] == pytest.approx(value, abs=1e-12) and row["passed"] is passed


def test_evaluate_checks_skips_unset_and_keeps_order():
    checks = {name: None for name in SCHEMA["checks"]}
    assert evaluate_checks(checks, REPORT) == []
    checks.update(max_loss_increase=1.0, min_sparsity=0.5, export_parity=False)
    rows = evaluate_checks(checks, REPORT)
    assert [r["check"] for r in rows] == [
        k for k in checks if k in ("min_sparsity", "max_loss_increase")
    ]
    assert all(r["passed"] for r in rows)


def test_evaluate_checks_unmeasurable_fails():
    regression = copy.deepcopy(REPORT)
    regression["metrics"]["dense"]["accuracy"] = regression["metrics"]["finetuned"]["accuracy"] = (
        None
    )
    row = one({"max_accuracy_drop": 100.0}, regression)
    assert row["value"] is None and row["passed"] is False
    for check in ("max_export_bytes", "max_export_ratio", "export_parity", "max_latency_ratio"):
        row = one({check: True if check == "export_parity" else 1e9})  # no receipt
        assert row["value"] is None and row["passed"] is False, check


@pytest.mark.parametrize(
    "check, limit, rec, value, passed",
    [
        ("max_export_bytes", 3000, receipt(), 2531, True),
        ("max_export_bytes", 2530, receipt(), 2531, False),
        ("max_export_ratio", 0.3, receipt(), 0.26, True),
        ("max_export_ratio", 0.2, receipt(), 0.26, False),
        ("export_parity", True, receipt(diff=1e-7), True, True),
        ("export_parity", True, receipt(diff=1e-3), False, False),
        ("max_latency_ratio", 1.6, receipt(), 1.5, True),  # batch64 ORT packed / ORT dense
        ("max_latency_ratio", 1.4, receipt(), 1.5, False),
    ],
)
def test_evaluate_checks_export_gates(check, limit, rec, value, passed):
    row = one({check: limit}, rec=rec)
    assert row["value"] == pytest.approx(value) and row["passed"] is passed


def test_latency_gate_with_dense_storage():
    row = one({"max_latency_ratio": 1.2}, rec=receipt(storage="dense"))
    assert row["value"] == pytest.approx(1.0) and row["passed"] is True


def test_min_sparsity_equal_to_final_passes_whatever_the_rounding():
    n = 2368
    report = copy.deepcopy(REPORT)
    report["sparsity"]["global"] = round(0.9 * n) / n
    report["params"] = {"prunable": n, "zeros": round(0.9 * n)}
    assert one({"min_sparsity": 0.9}, report)["passed"] is True


@pytest.fixture(scope="module")
def gate_recipe(tmp_path_factory, digits_model_file) -> Path:
    tree = base_tree(digits_model_file)
    tree["checks"] = {"min_sparsity": 0.85, "max_accuracy_drop": 50.0, "max_loss_increase": 5.0}
    return write(tmp_path_factory.mktemp("gates") / "gate.yaml", tree)


def run_gate(cli, recipe: Path, out: Path, *sets: str) -> tuple[int, str, dict]:
    args = ["run", recipe, "--out", out, "--quiet"]
    for item in sets:
        args += ["--set", item]
    code, stdout, stderr = cli(*args)
    assert code in (0, 1), stderr
    return code, stdout, json.loads((out / "report.json").read_text())


def test_run_all_gates_pass_exit_0(cli, tmp_path, gate_recipe):
    code, stdout, report = run_gate(cli, gate_recipe, tmp_path / "ok")
    assert code == 0
    assert [r["check"] for r in report["checks"]] == [
        "min_sparsity", "max_accuracy_drop", "max_loss_increase"
    ]  # fmt: skip
    assert all(r["passed"] for r in report["checks"])
    by = {r["check"]: r for r in report["checks"]}
    assert by["min_sparsity"]["value"] == report["sparsity"]["global"]
    m = report["metrics"]
    drop = 100 * (m["dense"]["accuracy"] - m["finetuned"]["accuracy"])
    assert by["max_accuracy_drop"]["value"] == pytest.approx(drop)
    assert "checks" in stdout and "pass" in stdout and "FAIL" not in stdout
    assert report["recipe"]["hash"] == recipe_hash(load_recipe(gate_recipe))
    for name in ("model.safetensors", "masks.safetensors", "metrics.jsonl"):
        assert (tmp_path / "ok" / name).is_file()


@pytest.mark.parametrize(
    "item, failing",
    [("checks.min_sparsity=0.95", "min_sparsity"),
     ("checks.max_accuracy_drop=-100", "max_accuracy_drop"),
     ("checks.max_loss_increase=-100", "max_loss_increase")],
)  # fmt: skip
def test_run_failing_gate_exit_1(cli, tmp_path, gate_recipe, item, failing):
    code, stdout, report = run_gate(cli, gate_recipe, tmp_path / "fail", item)
    assert code == 1
    by = {r["check"]: r for r in report["checks"]}
    assert by[failing]["passed"] is False
    assert [r["check"] for r in report["checks"] if not r["passed"]] == [failing]
    assert "FAIL" in stdout
    assert (tmp_path / "fail" / "model.safetensors").is_file()  # the run is still written


def test_run_export_gates(cli, tmp_path, gate_recipe):
    sets = ["export.enabled=true", "export.storage=packed", "checks.max_export_ratio=0.9",
            "checks.export_parity=true", "checks.max_export_bytes=1"]  # fmt: skip
    code, _, report = run_gate(cli, gate_recipe, tmp_path / "exp", *sets)
    assert code == 1
    by = {r["check"]: r for r in report["checks"]}
    rec = json.loads((tmp_path / "exp" / "model.onnx.json").read_text())
    assert by["max_export_bytes"]["passed"] is False
    assert (
        by["max_export_bytes"]["value"]
        == rec["bytes"]["file"]
        == (tmp_path / "exp" / "model.onnx").stat().st_size
    )
    assert (
        by["max_export_ratio"]["value"] == rec["bytes"]["ratio"]
        and by["max_export_ratio"]["passed"]
    )
    assert by["export_parity"]["value"] is True and by["export_parity"]["passed"]


def test_checked_gate_runs_are_deterministic_on_cpu(tmp_path, gate_recipe):
    from prunekit.recipe_run import run_recipe

    recipe = load_recipe(gate_recipe)
    a, _ = run_recipe(recipe, tmp_path / "a")
    b, _ = run_recipe(recipe, tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
    for name in ("masks.safetensors", "model.safetensors"):
        ta = load_model_tensors(tmp_path / "a" / name)
        tb = load_model_tensors(tmp_path / "b" / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_explain_counts_the_lr_probe_only_with_lr_auto(tmp_path, base):
    from prunekit.finetune import LR_CANDIDATES, PROBE_STEPS

    fixed = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    base["finetune"]["lr"] = "auto"
    auto = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    probe = len(LR_CANDIDATES) * PROBE_STEPS * 50  # batch_size 50 in the base recipe
    extra = auto["totals"]["finetune_backward"] - fixed["totals"]["finetune_backward"]
    assert extra == probe
    assert auto["totals"]["finetune_forward"] - fixed["totals"]["finetune_forward"] > probe
    assert any(note.startswith("lr auto:") for note in auto["notes"])
    assert not any(note.startswith("lr auto:") for note in fixed["notes"])


def test_explain_counts_wanda_forward_passes(tmp_path, base):
    base["criterion"] = {"name": "wanda", "score_examples": 200}
    plan = explain_recipe(load_recipe(write(tmp_path / "r.yaml", base)))
    assert all(r["score_forward"] == 200 and r["score_backward"] == 0 for r in plan["rows"])
