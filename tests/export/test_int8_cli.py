"""`prunekit export --quantize int8` and `prunekit prune --export --quantize int8`: the
receipt, --max-accuracy-drop refusals (exit 2, one line, no ONNX file) and bad values."""

from __future__ import annotations

import json

import pytest

import prunekit.export.int8 as int8_module

PRUNE_ARGS = [
    "--data", "digits", "--criterion", "magnitude", "--sparsity", "0.8", "--steps", "1",
    "--finetune-epochs", "0", "--final-epochs", "0", "--no-ntk", "--quiet",
]  # fmt: skip


def _one_line_error(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def losing(monkeypatch):
    """Make every int8 model score 5 points below its fp32 graph (a deterministic drop)."""
    real = int8_module.compare

    def compare(want, got, targets):
        out = real(want, got, targets)
        out["int8"] = out["fp32"] - 0.05
        out["change_points"] = -5.0
        return out

    monkeypatch.setattr(int8_module, "compare", compare)


def test_export_int8_writes_the_receipt_with_both_metrics(digits_model_file, tmp_path, cli):
    path = tmp_path / "q.onnx"
    code, stdout, stderr = cli("export", digits_model_file, "--out", path, "--quantize", "int8",
                               "--max-accuracy-drop", "5")  # fmt: skip
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.json"]
    receipt = json.loads((tmp_path / "q.onnx.json").read_text())
    q = receipt["quantization"]
    assert receipt["quantize"] == "int8" and q["method"] == "dynamic"
    assert q["metric"] == "accuracy" and q["max_accuracy_drop"] == 5.0
    assert q["change_points"] == pytest.approx(100 * (q["int8"] - q["fp32"]))
    assert q["fp32"] == pytest.approx(receipt["verification"]["accuracy_pytorch"])
    assert "int8 compute" in stdout and "int8 / fp32 latency" in stdout


def test_export_refused_past_the_limit_writes_nothing(digits_model_file, tmp_path, cli, losing):
    out = tmp_path / "new" / "q.onnx"
    code, _, stderr = cli("export", digits_model_file, "--out", out, "--quantize", "int8")
    line = _one_line_error(code, stderr)
    assert "drops 5.00 points" in line and "--max-accuracy-drop 1" in line
    assert "raise the limit" in line
    assert not (tmp_path / "new").exists()  # not even the folder it would have made


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--quantize", "int8", "--max-accuracy-drop", "-1"], "max accuracy drop -1.0"),
     (["--quantize", "int8", "--max-accuracy-drop", "nan"], "max accuracy drop nan"),
     (["--max-accuracy-drop", "1"], "does nothing without an int8 --quantize"),
     (["--quantize", "int9"], "valid: int8, int8-dynamic, int8-static, int8-weights"),
     (["--quantize", "int8", "--storage", "dense"], "use storage packed")],
)  # fmt: skip
def test_export_bad_quantize_options_exit_2(digits_model_file, tmp_path, cli, args, needle):
    code, _, stderr = cli("export", digits_model_file, "--out", tmp_path / "q.onnx", *args)
    assert needle in _one_line_error(code, stderr)
    assert list(tmp_path.iterdir()) == []


def test_prune_export_int8_refused_keeps_the_run_but_not_the_file(
    digits_model_file, tmp_path, cli, losing
):
    out = tmp_path / "run"
    code, _, stderr = cli("prune", digits_model_file, *PRUNE_ARGS, "--out", out,
                          "--export", out / "model.onnx", "--quantize", "int8",
                          "--max-accuracy-drop", "2")  # fmt: skip
    line = _one_line_error(code, stderr)
    assert "drops 5.00 points" in line and "--max-accuracy-drop 2" in line
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    assert not (out / "model.onnx").exists() and not (out / "model.onnx.json").exists()


def test_prune_export_int8_writes_an_integer_graph(digits_model_file, tmp_path, cli):
    out = tmp_path / "run"
    code, _, stderr = cli("prune", digits_model_file, *PRUNE_ARGS, "--out", out,
                          "--export", tmp_path / "elsewhere" / "m.onnx", "--quantize",
                          "int8-static", "--max-accuracy-drop", "5")  # fmt: skip
    assert code == 0, stderr
    receipt = json.loads((tmp_path / "elsewhere" / "m.onnx.json").read_text())
    q = receipt["quantization"]
    assert q["method"] == "static" and q["calibration"]["source"] == "training inputs"
    assert q["integer_ops"].get("QuantizeLinear", 0) > 0
    assert (
        receipt["verification"]["weights"]["zeros"] >= receipt["verification"]["weights"]["pruned"]
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--quantize", "int8"], "--quantize needs --export"),
     (["--max-accuracy-drop", "1"], "--max-accuracy-drop needs --export")],
)  # fmt: skip
def test_prune_quantize_needs_export(digits_model_file, tmp_path, cli, args, needle):
    code, _, stderr = cli("prune", digits_model_file, *PRUNE_ARGS, "--out", tmp_path / "r", *args)
    assert needle in _one_line_error(code, stderr)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("line", "needle"),
    [("  quantize: int9", "int8-weights"),
     ("  quantize: int8\n  max_accuracy_drop: -1", "export.max_accuracy_drop"),
     ("  quantize: int8\n  max_accuracy_drop: .nan", "export.max_accuracy_drop")],
)  # fmt: skip
def test_recipe_export_quantize_keys_are_validated(tmp_path, cli, line, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel:\n  example: mlp-digits\nexport:\n  enabled: true\n{line}\n"
    )
    code, _, stderr = cli("validate", recipe)
    assert needle in _one_line_error(code, stderr)


def test_recipe_with_int8_export_and_its_gates_validates(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel:\n  example: mlp-digits\nexport:\n  enabled: true\n  quantize: int8\n"
        "  max_accuracy_drop: 0.5\nchecks:\n  max_latency_ratio: 0.6\n"
    )
    code, stdout, stderr = cli("validate", recipe)
    assert code == 0, stderr


def test_prune_units_export_int8_is_the_shrunk_graph_in_int8(digits_model_file, tmp_path, cli):
    out = tmp_path / "run"
    code, _, stderr = cli("prune", digits_model_file, *PRUNE_ARGS, "--structure", "units",
                          "--out", out, "--export", out / "m.onnx", "--quantize", "int8",
                          "--max-accuracy-drop", "5")  # fmt: skip
    assert code == 0, stderr
    receipt = json.loads((out / "m.onnx.json").read_text())
    assert receipt["storage"] == "packed" and receipt["quantization"]["method"] == "dynamic"
    units = receipt["units"]
    assert units["params_after"] < units["params_before"]
    assert receipt["quantization"]["integer_ops"]["MatMulInteger"] == 2  # 64-32-10
