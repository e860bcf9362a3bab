"""Issue 7's "done when": `prunekit prune` end to end on LSTM, BN-LSTM (and GRU) checkpoints.

Exact sparsity over the recurrent matrices and the head, the diag estimator named for the
recurrent weights, pruned weights still exactly zero after the final fine-tune (through
nn.LSTM's flat-weight packing), ONNX export parity, and BN recalibration on for BN-LSTM by
default (off with --no-recalibrate-bn).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from prunekit.checkpoint import ARCH_KEY, build_model, load_model
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, finetune
from prunekit.prune.state import save_tensors
from prunekit.types import ClassificationTask

ARCH = "prunekit.models:lstm?input_size=8&hidden=16&classes=10&cell={cell}&rows=8"
HIDDEN, FEATURES, CLASSES = 16, 8, 10
SPARSITY = 0.8
GATES = {"lstm": 4, "bnlstm": 4, "gru": 3}
RECURRENT = {
    "lstm": ("rnn.weight_ih_l0", "rnn.weight_hh_l0"),
    "gru": ("rnn.weight_ih_l0", "rnn.weight_hh_l0"),
    "bnlstm": ("rnn.cell.weight_ih", "rnn.cell.weight_hh"),
}
PRUNE_ARGS = [
    "--criterion", "obd", "--sparsity", str(SPARSITY), "--steps", "2",
    "--finetune-epochs", "0.2", "--final-epochs", "0.2", "--score-examples", "100", "--quiet",
]  # fmt: skip
RUN_FILES = ("model.safetensors", "masks.safetensors", "metrics.jsonl", "report.json")
RECAL_KEYS = ("loss_before_recalibration", "loss_after_recalibration")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def prunable_count(cell: str) -> int:
    g = GATES[cell] * HIDDEN
    return g * FEATURES + g * HIDDEN + CLASSES * HIDDEN


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, digits) -> dict[str, Path]:
    """cell -> a briefly trained sequence classifier (digits row by row) as prunekit safetensors."""
    folder = tmp_path_factory.mktemp("recurrent_ckpt")
    paths = {}
    for cell in GATES:
        arch = ARCH.format(cell=cell)
        torch.manual_seed(0)
        model = build_model(arch)
        gen = torch.Generator().manual_seed(0)
        phase = FinetuneSettings(epochs=0.5, optimizer="adamw", lr=0.02, weight_decay=0.0)
        finetune(model, ClassificationTask(), digits.train_batches(50, gen), phase)
        paths[cell] = folder / f"{cell}.safetensors"
        save_tensors(paths[cell], model.state_dict(), {ARCH_KEY: arch, "prunekit.data": "digits"})
    return paths


def prune_cli(cli, checkpoint: Path, out: Path, *extra, export: bool = True) -> dict:
    before = checkpoint.read_bytes()
    args = [*PRUNE_ARGS, "--out", out, *extra]
    if export:
        args += ["--export", out / "model.onnx"]
    code, stdout, stderr = cli("prune", checkpoint, *args)
    assert checkpoint.read_bytes() == before  # the input is never touched
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr, "ckpt": checkpoint}


@pytest.fixture(scope="module", params=["lstm", "bnlstm"])
def e2e(request, checkpoints, tmp_path_factory, cli) -> dict:
    cell = request.param
    out = tmp_path_factory.mktemp(f"e2e_{cell}") / "run"
    run = prune_cli(cli, checkpoints[cell], out)
    run["cell"] = cell
    return run


@pytest.fixture(scope="module")
def bnlstm_no_recal(checkpoints, tmp_path_factory, cli) -> dict:
    out = tmp_path_factory.mktemp("bnlstm_norecal") / "run"
    args = ("--no-recalibrate-bn", "--no-ntk")
    return prune_cli(cli, checkpoints["bnlstm"], out, *args, export=False)


@pytest.fixture(scope="module")
def gru_run(checkpoints, tmp_path_factory, cli) -> dict:
    # --no-ntk: the tangent kernel of nn.GRU is ~10x slower than nn.LSTM's at this size
    out = tmp_path_factory.mktemp("gru") / "run"
    run = prune_cli(cli, checkpoints["gru"], out, "--no-ntk")
    run["cell"] = "gru"
    return run


def report_of(run: dict) -> dict:
    return json.loads((run["out"] / "report.json").read_text())


def check_exact_sparsity(run: dict) -> None:
    cell, out = run["cell"], run["out"]
    report = report_of(run)
    weights = read_safetensors(out / "model.safetensors")
    masks = read_safetensors(out / "masks.safetensors")
    targets = {*RECURRENT[cell], "head.weight"}
    assert set(masks) == targets == set(report["sparsity"]["per_layer"])
    n = sum(masks[k].numel() for k in targets)
    assert n == prunable_count(cell) == report["params"]["prunable"]
    want = round(SPARSITY * n)
    zeros = sum(int((weights[k] == 0).sum()) for k in targets)
    pruned = sum(int((masks[k] == 0).sum()) for k in targets)
    assert zeros == want == pruned == report["params"]["zeros"]
    assert report["sparsity"]["global"] == pytest.approx(want / n, abs=1e-12)
    for k in RECURRENT[cell]:
        assert int((masks[k] == 0).sum()) > 0, k  # the recurrent matrices are really pruned


def check_pruned_stay_zero(run: dict) -> None:
    """Masked weights are exactly 0 after the final fine-tune; survivors were trained."""
    cell, out = run["cell"], run["out"]
    dense = read_safetensors(run["ckpt"])
    weights = read_safetensors(out / "model.safetensors")
    masks = read_safetensors(out / "masks.safetensors")
    for k in RECURRENT[cell]:
        keep = masks[k].bool()
        assert torch.count_nonzero(weights[k][~keep]) == 0, k
        assert not torch.equal(weights[k][keep], dense[k][keep]), k  # fine-tuning moved them
    # the loaded module (nn.LSTM re-packs its flat weights) holds the same zeros
    model = load_model(out / "model.safetensors").model
    params = dict(model.named_parameters())
    for k in RECURRENT[cell]:
        assert torch.count_nonzero(params[k].detach()[~masks[k].bool()]) == 0, k


def check_export_parity(run: dict, digits) -> None:
    out = run["out"]
    receipt = json.loads((out / "model.onnx.json").read_text())
    ver = receipt["verification"]
    assert ver["max_abs_diff"] <= 1e-5 and ver["n_inputs"] > 0
    assert ver["weights"]["zeros"] >= ver["weights"]["pruned"] > 0
    # independently: onnxruntime on the exported file vs the saved pruned weights in torch
    model = load_model(out / "model.safetensors").model.eval()
    x = digits.x_val[:64]
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == want.shape == (64, CLASSES)
    assert float(np.abs(got - want).max()) <= 1e-5


# ------------------------------------------------------------------ LSTM and BN-LSTM


def test_prune_exits_0_and_writes_run_and_export(e2e):
    assert e2e["code"] == 0, e2e["stderr"]
    assert "Traceback" not in e2e["stderr"]
    for name in (*RUN_FILES, "model.onnx", "model.onnx.json"):
        assert (e2e["out"] / name).is_file(), name
    assert not list(e2e["out"].rglob(".*.tmp"))


def test_sparsity_exact_over_recurrent_matrices_and_head(e2e):
    check_exact_sparsity(e2e)
    report = report_of(e2e)
    assert len(report["steps"]) == 2 and report["target_sparsity"] == SPARSITY
    for phase in ("dense", "pruned", "finetuned"):
        assert math.isfinite(report["metrics"][phase]["loss"]), phase


def test_recurrent_weights_scored_with_diag(e2e):
    report = report_of(e2e)
    assert report["fisher"] == "ekfac"  # obd's default: EKFAC where it applies
    assert set(report["estimators"]) == {*RECURRENT[e2e["cell"]], "head.weight"}
    for k in RECURRENT[e2e["cell"]]:
        assert report["estimators"][k] == "diag", k
    assert report["estimators"]["head.weight"] == "ekfac"


def test_pruned_recurrent_weights_stay_zero_after_final_finetune(e2e):
    check_pruned_stay_zero(e2e)


def test_export_parity(e2e, digits):
    check_export_parity(e2e, digits)


def test_bn_recalibration_default_follows_batchnorm(e2e):
    report = report_of(e2e)
    if e2e["cell"] == "bnlstm":
        assert report["bn_recalibration"] is True
        for row in report["steps"]:
            for key in RECAL_KEYS:
                assert isinstance(row[key], float) and math.isfinite(row[key]), (row["step"], key)
            # measured right after pruning, before any fine-tuning of this step
            assert row["loss_before_recalibration"] == row["loss_after_prune"]
    else:
        assert report["bn_recalibration"] is False
        assert not any(key in row for row in report["steps"] for key in RECAL_KEYS)


def test_no_recalibrate_bn_turns_it_off_for_bnlstm(bnlstm_no_recal):
    assert bnlstm_no_recal["code"] == 0, bnlstm_no_recal["stderr"]
    report = report_of(bnlstm_no_recal)
    assert report["bn_recalibration"] is False
    assert report["settings"]["recalibrate_bn"] is False
    assert len(report["steps"]) == 2
    assert not any(key in row for row in report["steps"] for key in RECAL_KEYS)


# ------------------------------------------------------------------ GRU


def test_gru_checkpoint_prunes_and_exports(gru_run, digits):
    assert gru_run["code"] == 0, gru_run["stderr"]
    for name in (*RUN_FILES, "model.onnx", "model.onnx.json"):
        assert (gru_run["out"] / name).is_file(), name
    check_exact_sparsity(gru_run)
    report = report_of(gru_run)
    for k in RECURRENT["gru"]:
        assert report["estimators"][k] == "diag", k
    assert report["bn_recalibration"] is False
    check_pruned_stay_zero(gru_run)
    check_export_parity(gru_run, digits)


def test_report_gives_recurrent_sparsity_per_gate():
    """Rows of LSTM/BN-LSTM matrices are gate blocks i, f, g, o; GRU r, z, n."""
    import torch

    from prunekit.prune.targets import find_targets
    from prunekit.report import _gate_sparsity

    for cell, gates in (("lstm", 4), ("bnlstm", 4), ("gru", 3)):
        model = build_model(f"prunekit.models:lstm?input_size=8&hidden=4&classes=3&cell={cell}")
        targets = find_targets(model)
        masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
        name = next(n for n, t in targets.items() if t.kind == "recurrent")
        masks[name][:4] = False  # the whole first gate block (hidden 4)
        per_gate = _gate_sparsity(model, targets, masks)
        assert set(per_gate) == {n for n, t in targets.items() if t.kind == "recurrent"}
        values = list(per_gate[name].values())
        assert len(values) == gates and values[0] == 1.0 and all(v == 0.0 for v in values[1:])
