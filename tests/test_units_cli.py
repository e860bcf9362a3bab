"""--structure units end to end: the run, the smaller export, and a later `prunekit export`."""

from __future__ import annotations

import json

import onnx
import pytest


@pytest.fixture(scope="module")
def units_run(tmp_path_factory, digits_model_file, cli):
    out = tmp_path_factory.mktemp("units") / "run"
    onnx_path = out.parent / "m.onnx"
    code, stdout, stderr = cli(
        "prune", str(digits_model_file), "--structure", "units", "--sparsity", "0.5",
        "--steps", "2", "--finetune-epochs", "0.5", "--final-epochs", "0.5", "--lr", "0.05",
        "--export", str(onnx_path), "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    return out, onnx_path


def test_units_run_removes_half_the_hidden_units(units_run):
    out, _ = units_run
    report = json.loads((out / "report.json").read_text())
    assert report["units"]["units_before"] == 32 and report["units"]["units_after"] == 16
    assert report["units"]["params_after"] < report["units"]["params_before"]
    assert report["steps"][-1]["sparsity"] == pytest.approx(0.5)


def test_units_export_is_physically_smaller_and_verified(units_run):
    _, onnx_path = units_run
    receipt = json.loads(onnx_path.with_name("m.onnx.json").read_text())
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(onnx_path)).graph.initializer}
    assert sorted(s for s in shapes.values() if len(s) == 2) == [(10, 16), (16, 64)]
    assert receipt["units"]["params_before"] == 64 * 32 + 32 + 32 * 10 + 10
    assert receipt["units"]["params_after"] == 64 * 16 + 16 + 16 * 10 + 10
    assert receipt["storage"] == "dense"
    assert "latency_ratio_batch64" in receipt["units"]


def test_export_command_shrinks_a_saved_units_run(units_run, cli, tmp_path):
    out, _ = units_run
    again = tmp_path / "again.onnx"
    code, stdout, stderr = cli("export", str(out / "model.safetensors"), "--out", str(again))
    assert code == 0, stderr
    shapes = [tuple(i.dims) for i in onnx.load(str(again)).graph.initializer if len(i.dims) == 2]
    assert sorted(shapes) == [(10, 16), (16, 64)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shots", "2"], "--shots applies to single weights"),
        (["--update", "summed"], "--update applies to single weights"),
        (["--criterion", "wanda"], "criterion for --structure units"),
    ],
)
def test_units_refuses_single_weight_options(tmp_path, digits_model_file, cli, args, message):
    out = tmp_path / "run"
    code, _, stderr = cli(
        "prune", str(digits_model_file), "--structure", "units", "--out", str(out), *args
    )
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], stderr
    assert not out.exists()


@pytest.mark.parametrize("value", ["evil", "os.system", "units" * 30, ""])
def test_export_refuses_a_malformed_structure_in_metadata(tmp_path, digits_model_file, cli, value):
    from safetensors import safe_open

    from prunekit.prune.state import save_tensors

    with safe_open(str(digits_model_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors, {**meta, "prunekit.structure": value})
    out = tmp_path / "m.onnx"
    code, stdout, stderr = cli("export", str(bad), "--out", str(out))
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "prunekit.structure" in lines[0], stderr
    assert "unstructured, units" in lines[0] and "Traceback" not in stderr + stdout
    assert not out.exists() and not out.with_name("m.onnx.json").exists()
