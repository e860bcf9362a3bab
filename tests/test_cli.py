"""The `prunekit` CLI: an end-to-end run on digits, every bad input, help texts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from safetensors import safe_open
from torch import nn

from prunekit.checkpoint import ARCH_KEY, load_model
from prunekit.data import load_data
from prunekit.finetune import evaluate
from prunekit.prune.schedules import schedule
from prunekit.prune.state import save_tensors
from prunekit.types import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
SPARSITY, STEPS = 0.9, 3
RUN_ARGS = [
    "--data", "digits", "--criterion", "obd", "--fisher", "diag", "--sparsity", str(SPARSITY),
    "--steps", str(STEPS), "--finetune-epochs", "0.2", "--final-epochs", "0.2",
]  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, digits_model_file, cli):
    out = tmp_path_factory.mktemp("e2e") / "run"
    before = digits_model_file.read_bytes()
    code, stdout, stderr = cli("prune", digits_model_file, *RUN_ARGS, "--out", out, "--quiet")
    assert digits_model_file.read_bytes() == before  # the input is never touched
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr}


def test_e2e_exit_code_and_files(e2e):
    assert e2e["code"] == 0, e2e["stderr"]
    assert "Traceback" not in e2e["stderr"]
    for name in ("model.safetensors", "masks.safetensors", "metrics.jsonl", "report.json"):
        assert (e2e["out"] / name).is_file(), name
    assert not list(e2e["out"].rglob(".*.tmp"))  # no temporary files left behind
    assert "dense" in e2e["stdout"] and "fine-tuned" in e2e["stdout"]


def test_e2e_report_has_every_documented_key(e2e):
    report = json.loads((e2e["out"] / "report.json").read_text())
    assert report["criterion"] == "obd"
    assert report["fisher"] == "diag"
    assert report["target_sparsity"] == SPARSITY
    assert isinstance(report["sparsity"]["global"], float)
    assert isinstance(report["sparsity"]["per_layer"], dict) and report["sparsity"]["per_layer"]
    for key in ("total", "prunable", "zeros"):
        assert isinstance(report["params"][key], int), key
    for phase in ("dense", "pruned", "finetuned"):
        metrics = report["metrics"][phase]
        assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["accuracy"] <= 1.0, phase
    assert len(report["steps"]) == STEPS
    for k, row in enumerate(report["steps"], start=1):
        for key in ("sparsity", "loss_after_prune", "loss_after_finetune", "accuracy", "seconds"):
            assert isinstance(row[key], float), (k, key)
        assert row["step"] == k
        assert "ntk_alignment" in row
    assert report["seconds"] > 0
    assert report["data"] == {"split": "random 80/20 (seed 0)", "train": 1438, "val": 359}
    assert report["metrics"]["dense"]["accuracy"] > 0.8  # the fixture model learned digits
    assert report["metrics"]["finetuned"]["accuracy"] > 0.5


def test_e2e_sparsity_exact_to_one_weight(e2e):
    report = json.loads((e2e["out"] / "report.json").read_text())
    weights, meta = read_safetensors(e2e["out"] / "model.safetensors")
    masks, mask_meta = read_safetensors(e2e["out"] / "masks.safetensors")
    assert set(masks) == {"1.weight", "3.weight"} == set(report["sparsity"]["per_layer"])
    n = sum(m.numel() for m in masks.values())
    assert n == 64 * 32 + 32 * 10 == report["params"]["prunable"]
    want = round(SPARSITY * n)
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    zeros = sum(int((weights[k] == 0).sum()) for k in masks)
    assert pruned == want == zeros == report["params"]["zeros"]
    assert report["sparsity"]["global"] == pytest.approx(want / n, abs=1e-12)
    assert report["params"]["total"] == sum(w.numel() for w in weights.values())
    for k, m in masks.items():
        assert bool((weights[k][m == 0] == 0).all())  # the weights hold the masks' zeros
        assert report["sparsity"]["per_layer"][k] == pytest.approx(float((m == 0).float().mean()))
    assert mask_meta["prunekit.kind"] == "masks"
    assert meta[ARCH_KEY] == "prunekit.models:mlp?sizes=64,32,10&act=tanh"


def test_e2e_steps_follow_the_schedule_and_metrics_jsonl(e2e):
    report = json.loads((e2e["out"] / "report.json").read_text())
    n = report["params"]["prunable"]
    for row, target in zip(report["steps"], schedule(SPARSITY, STEPS), strict=True):
        assert row["sparsity"] == pytest.approx(round(target * n) / n, abs=1e-12)
    lines = (e2e["out"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 1
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[0]["sparsity"] == 0.0


def test_e2e_saved_model_reloads_without_arch_and_is_the_final_model(e2e):
    report = json.loads((e2e["out"] / "report.json").read_text())
    loaded = load_model(e2e["out"] / "model.safetensors")
    data = load_data("digits", seed=0)
    metrics = evaluate(loaded.model, ClassificationTask(), data.val_batches())
    assert metrics["accuracy"] == pytest.approx(report["metrics"]["finetuned"]["accuracy"])
    assert metrics["loss"] == pytest.approx(report["metrics"]["finetuned"]["loss"], rel=1e-5)


def test_rerun_with_overwrite_layer_scope_and_paper_mode(e2e, tmp_path, digits_model_file, cli):
    out = tmp_path / "run"
    shutil.copytree(e2e["out"], out)
    args = ["--criterion", "magnitude", "--scope", "layer", "--sparsity", "0.5", "--steps", "2",
            "--finetune-epochs", "0", "--final-epochs", "0", "--no-ntk", "--quiet"]  # fmt: skip
    code, _, err = cli("prune", digits_model_file, "--out", out, *args)
    assert code == 2 and "--overwrite" in err  # an earlier run is there
    code, _, err = cli("prune", digits_model_file, "--out", out, "--overwrite", *args)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "magnitude" and report["fisher"] is None
    masks, _ = read_safetensors(out / "masks.safetensors")
    for k, m in masks.items():
        assert int((m == 0).sum()) == round(0.5 * m.numel()), k
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------ bad input

BN_ONLY = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64))
REG_ARCH = "prunekit.models:mlp?sizes=20,8,4&act=tanh"


def _state_dict_pt(tmp: Path, dense: Path) -> Path:
    path = tmp / "dense_sd.pt"
    torch.save(load_model(dense).model.state_dict(), path)
    return path


UNKNOWN_CHOICE = {
    "unknown criterion": ("--criterion", "magnitude"),
    "unknown fisher": ("--fisher", "ekfac"),
    "unknown fisher-labels": ("--fisher-labels", "empirical"),
    "unknown schedule": ("--schedule", "linear"),
    "unknown scope": ("--scope", "layer"),
    "unknown device": ("--device", "cpu"),
    "unknown optimizer": ("--optimizer", "adamw"),
}


def _case(tmp: Path, dense: Path, name: str):
    """(args, input files, substrings the error must contain) of bad-input case ``name``."""
    out = ["--out", tmp / "out"]
    base = [dense, "--data", "digits", *out]
    if name == "missing file":
        return ["prune", tmp / "missing.safetensors", *out], [], ["missing.safetensors", "exist"]
    if name == "corrupt pt":
        (tmp / "corrupt.pt").write_bytes(b"\x80\x02garbage" * 50)
        return ["prune", tmp / "corrupt.pt", *out], [tmp / "corrupt.pt"], ["corrupt.pt", "corrupt"]
    if name == "corrupt safetensors":
        path = tmp / "bad.safetensors"
        path.write_bytes(dense.read_bytes()[:300])
        return ["prune", path, "--data", "digits", *out], [path], ["bad.safetensors"]
    if name == "pickle without --trust-pickle":
        path = tmp / "full.pt"
        torch.save(load_model(dense).model, path)
        return ["prune", path, "--data", "digits", *out], [path], ["full.pt", "--trust-pickle"]
    if name in UNKNOWN_CHOICE:
        option, valid = UNKNOWN_CHOICE[name]
        return ["prune", *base, option, "bogus"], [], ["'bogus'", valid]
    if name.startswith("sparsity "):
        value = name.split()[1]
        return ["prune", *base, "--sparsity", value], [], [value, "[0, 1)"]
    if name == "steps 0":
        return ["prune", *base, "--steps", "0"], [], ["steps 0", ">= 1"]
    if name == "negative lambda":
        return ["prune", *base, "--lambda", "-1"], [], ["lambda -1", ">= 0"]
    if name == "negative finetune epochs":
        return ["prune", *base, "--finetune-epochs", "-1"], [], ["-1", ">= 0"]
    if name == "arch that does not import":
        sd = _state_dict_pt(tmp, dense)
        args = ["prune", sd, "--arch", "no_such_module_xyz:mlp", "--data", "digits", *out]
        return args, [sd], ["no_such_module_xyz:mlp", "module:factory"]
    if name == "bad arch syntax":
        sd = _state_dict_pt(tmp, dense)
        args = ["prune", sd, "--arch", "prunekit.models.mlp", "--data", "digits", *out]
        return args, [sd], ["prunekit.models.mlp", "module:factory"]
    if name == "state_dict missing keys":
        sd = _state_dict_pt(tmp, dense)
        arch = "prunekit.models:mlp?sizes=64,32,16,10"
        args = ["prune", sd, "--arch", arch, "--data", "digits", *out]
        return args, [sd], ["missing keys", "5.weight", "unexpected keys []"]
    if name == "state_dict unexpected keys":
        sd = _state_dict_pt(tmp, dense)
        args = ["prune", sd, "--arch", "prunekit.models:mlp?sizes=64,10", "--data", "digits", *out]
        return args, [sd], ["unexpected keys", "3.weight", "missing keys []"]
    if name == "weights without arch":
        sd = _state_dict_pt(tmp, dense)
        return ["prune", sd, "--data", "digits", *out], [sd], ["--arch"]
    if name == "data shape does not fit":
        return ["prune", dense, "--data", "synthetic", *out], [], ["synthetic", "(20,)", "fit"]
    if name == "missing data file":
        return ["prune", dense, "--data", tmp / "nope.npz", *out], [], ["nope.npz", "exist"]
    if name == "unknown data spec":
        return ["prune", dense, "--data", "cifar10", *out], [], ["'cifar10'", "digits"]
    if name == "no prunable weights (torchscript)":
        path = tmp / "bn.pt"
        torch.jit.script(BN_ONLY).save(str(path))
        return ["prune", path, "--data", "digits", *out], [path], ["no prunable weights"]
    if name == "no prunable weights (pickle)":
        path = tmp / "bn_full.pt"
        torch.save(BN_ONLY, path)
        args = ["prune", path, "--trust-pickle", "--data", "digits", *out]
        return args, [path], ["no prunable weights"]
    if name == "earlier run without --overwrite":
        (tmp / "out").mkdir()
        for f in ("report.json", "metrics.jsonl"):
            (tmp / "out" / f).write_text("{}\n")
        return ["prune", *base], [], ["earlier run", "--overwrite"]
    if name == "out would overwrite the input":
        run = tmp / "run"
        run.mkdir()
        model = run / "model.safetensors"
        shutil.copy(dense, model)
        args = ["prune", model, "--data", "digits", "--out", run, "--overwrite"]
        return args, [model], ["would overwrite the input"]
    if name == "exact labels on regression":
        torch.manual_seed(0)
        from prunekit.checkpoint import build_model

        path = tmp / "reg.safetensors"
        save_tensors(path, build_model(REG_ARCH).state_dict(), {ARCH_KEY: REG_ARCH})
        data = "synthetic?task=regression"
        args = ["prune", path, "--data", data, "--fisher-labels", "exact", *out]
        return args, [path], ["'exact'", "regression", "sampled"]
    if name == "no data anywhere":
        path = tmp / "nodata.safetensors"
        state = load_model(dense).model.state_dict()
        save_tensors(path, state, {ARCH_KEY: "prunekit.models:mlp?sizes=64,32,10&act=tanh"})
        return ["prune", path, *out], [path], ["--data"]
    if name == "unknown option":
        return ["prune", *base, "--sparsty", "0.5"], [], ["--sparsty"]
    if name == "non-numeric sparsity":
        return ["prune", *base, "--sparsity", "lots"], [], ["--sparsity", "lots"]
    raise AssertionError(name)


BAD_INPUTS = [
    "missing file",
    "corrupt pt",
    "corrupt safetensors",
    "pickle without --trust-pickle",
    "unknown criterion",
    "unknown fisher",
    "unknown fisher-labels",
    "unknown schedule",
    "unknown scope",
    "unknown device",
    "unknown optimizer",
    "sparsity 1.0",
    "sparsity -0.1",
    "sparsity nan",
    "sparsity inf",
    "steps 0",
    "negative lambda",
    "negative finetune epochs",
    "arch that does not import",
    "bad arch syntax",
    "state_dict missing keys",
    "state_dict unexpected keys",
    "weights without arch",
    "data shape does not fit",
    "missing data file",
    "unknown data spec",
    "no prunable weights (torchscript)",
    "no prunable weights (pickle)",
    "earlier run without --overwrite",
    "out would overwrite the input",
    "exact labels on regression",
    "no data anywhere",
    "unknown option",
    "non-numeric sparsity",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(name, tmp_path, digits_model_file, cli):
    dense = tmp_path / "dense.safetensors"
    shutil.copy(digits_model_file, dense)
    args, inputs, expected = _case(tmp_path, dense, name)
    inputs = [dense, *inputs]
    before_inputs = {p: p.read_bytes() for p in inputs}
    outs = [tmp_path / "out", tmp_path / "run"]
    before_outs = {p: snapshot(p) for p in outs}
    cwd_runs = Path("runs")
    runs_before = snapshot(cwd_runs)

    code, stdout, stderr = cli(*args)

    assert code == 2, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in stderr + stdout
    assert stdout == ""
    for p, data in before_inputs.items():
        assert p.read_bytes() == data, f"input {p.name} changed"
    for p, snap in before_outs.items():
        assert snapshot(p) == snap, f"{p.name} changed"
    assert snapshot(cwd_runs) == runs_before
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_validation_error_without_quiet_prints_exactly_one_line(tmp_path, digits_model_file, cli):
    code, stdout, stderr = cli(
        "prune", digits_model_file, "--criterion", "bogus", "--out", tmp_path / "out"
    )
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, repr(stderr)
    assert "'bogus'" in stderr and "auto" in stderr and "obd" in stderr  # what is valid


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["example", "bogus", "--out", "{tmp}/m.safetensors"], ["'bogus'", "mlp-digits"]),
        (["example", "mlp-digits", "--out", "{tmp}/m.pt"], ["m.pt", ".safetensors"]),
        (["example", "mlp-digits", "--out", "{tmp}/exists.safetensors"], ["--overwrite"]),
    ],
)
def test_example_bad_input(tmp_path, cli, args, expected):
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    code, stdout, stderr = cli(*[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert all(text in lines[0] for text in expected), lines[0]
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [("missing", "does not exist"), ("criterion", "unknown criterion 'bogus'")],
)
def test_real_process_prints_one_line_and_no_traceback(tmp_path, digits_model_file, make, expected):
    model = tmp_path / "missing.pt" if make == "missing" else digits_model_file
    args = ["prune", str(model), "--out", str(tmp_path / "out")]
    if make == "criterion":
        args += ["--criterion", "bogus", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_prune_a_torchscript_archive(tmp_path, digits_model_file, cli):
    path = tmp_path / "scripted.pt"
    torch.jit.script(load_model(digits_model_file).model).save(str(path))
    code, _, stderr = cli(
        "prune", path, "--data", "digits", "--criterion", "magnitude", "--steps", "1",
        "--sparsity", "0.5", "--finetune-epochs", "0", "--final-epochs", "0", "--no-ntk",
        "--quiet", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------ help


def _normalise(text: str) -> str:
    """Help text as one line: rich's panel borders (box drawing) removed, whitespace joined."""
    plain = "".join(" " if "\u2500" <= ch <= "\u257f" else ch for ch in text)
    return " ".join(plain.split())


def test_top_level_help_lists_every_command(cli):
    from prunekit.cli import app

    code, stdout, _ = cli("--help")
    assert code == 0
    command = typer.main.get_command(app)
    assert {"prune", "example"} <= set(command.commands)
    for name, sub in command.commands.items():
        assert name in stdout
        assert sub.help or sub.short_help, name


def test_prune_help_lists_every_option_with_help_text(cli):
    from prunekit.cli import app

    code, stdout, _ = cli("prune", "--help")
    assert code == 0
    text = _normalise(stdout)
    params = typer.main.get_command(app).commands["prune"].params
    assert len(params) >= 20
    for param in params:
        assert param.help and param.help.strip(), param.name
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if opt.startswith("-"):
                assert opt in text, opt
        assert _normalise(param.help)[:25] in text, param.name
    for documented in ("--criterion", "--sparsity", "--steps", "--schedule", "--fisher",
                       "--fisher-labels", "--lambda", "--scope", "--data", "--arch",
                       "--finetune-epochs", "--out", "--trust-pickle", "--seed", "--device",
                       "--overwrite"):  # fmt: skip
        assert documented in text, documented
