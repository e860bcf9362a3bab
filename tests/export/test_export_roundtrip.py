"""export_onnx round trips: every storage mode on an MLP, a CNN with BatchNorm and an LSTM."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_models import make_mlp, random_masks
from torch import nn

from prunekit.errors import ModelError
from prunekit.export import export_onnx
from prunekit.export import exporters as exporters_mod


@pytest.mark.parametrize("storage", ["dense", "sparse", "packed"])
def test_every_mode_has_parity(pruned_model, storage, tmp_path):
    name, model, masks, x = pruned_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"{name}.onnx"
    receipt = export_onnx(model, path, x[:2], storage=storage, masks=masks, verify_inputs=x,
                          latency=False)  # fmt: skip
    v = receipt["verification"]
    assert path.is_file() and receipt["exporter"] == "torchscript"
    assert v["max_abs_diff"] <= 1e-5 and v["n_inputs"] == 16
    assert v["checker"] == ("basic" if storage == "sparse" else "full")
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert v["weights"]["zeros"] >= v["weights"]["pruned"] >= pruned * 0.5
    onnx.checker.check_model(onnx.load(path), full_check=storage != "sparse")
    # every masked weight was found in the graph and stored as the mode asks
    assert receipt["unmatched_weights"] == []
    stored = {t["stored_as"] for t in receipt["tensors"]}
    assert storage in stored and stored <= {storage, "dense"}
    # a tensor stays dense only where the mode would not save bytes (tiny tensors)
    assert all(t["bytes"] < 1024 for t in receipt["tensors"] if t["stored_as"] != storage)
    # the caller's model is untouched (masks were baked into a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # dynamic batch: a batch size never seen at export time runs
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": x[:7].numpy()})[0].shape[0] == 7


def _big_mlp(sparsity: float):
    torch.manual_seed(0)
    model = make_mlp((784, 300, 100, 10)).eval()
    return model, random_masks(model, sparsity), torch.randn(8, 784)


def test_packed_ratio_at_90pct_and_mode_order(tmp_path):
    model, masks, x = _big_mlp(0.9)
    ratios = {}
    for storage in ("dense", "sparse", "packed"):
        r = export_onnx(model, tmp_path / f"{storage}.onnx", x, storage=storage, masks=masks,
                        cleanup=False, latency=False)  # fmt: skip
        ratios[storage] = r["bytes"]["ratio"]
    q = export_onnx(model, tmp_path / "q.onnx", x, quantize="int8-weights", masks=masks,
                    cleanup=False,
                    verify_targets=torch.randint(0, 10, (8,)), latency=False)  # fmt: skip
    # measured: dense 1.00x, sparse 0.30x, packed 0.126x, packed+int8 0.055x
    assert 0.99 < ratios["dense"] < 1.01
    assert ratios["packed"] <= 0.13 < ratios["sparse"] < 0.35
    assert q["bytes"]["ratio"] <= 0.06
    assert "accuracy_change" in q["verification"]
    assert abs(q["verification"]["accuracy_change"]) <= 0.25
    assert q["verification"]["max_abs_diff"] > 0  # int8 really is lossy; not held to 1e-5


def test_onnxruntime_folds_packed_weight_back_exactly(tmp_path):
    """The optimized graph onnxruntime runs holds the exact dense pruned weight, no decoder."""
    model, masks, x = _big_mlp(0.9)
    export_onnx(model, tmp_path / "m.onnx", x, masks=masks, cleanup=False, latency=False)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    ops = {n.op_type for n in opt.graph.node}
    assert not ops & {"ScatterElements", "CumSum", "Mul"}
    arrays = [onnx.numpy_helper.to_array(t) for t in opt.graph.initializer]
    want = (model[0].weight * masks["0.weight"]).detach().numpy()
    assert any(a.shape == want.shape and np.array_equal(a, want) for a in arrays)


def test_packed_graph_has_no_mask_and_no_dense_copy(tmp_path):
    model, masks, x = _big_mlp(0.9)
    export_onnx(model, tmp_path / "m.onnx", x, masks=masks, latency=False)
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert "Mul" not in {n.op_type for n in graph.node}
    sizes = [int(np.prod(t.dims)) for t in graph.initializer if t.data_type == 1]
    weights = [p.numel() for n, p in model.named_parameters() if n in masks]
    assert not set(sizes) & set(weights)  # no dense copy of any weight
    # every fp32 value stored: ~10% of the weights plus biases, nothing dense
    assert sum(sizes) <= 0.11 * sum(weights) + 410


def test_lstm_weights_are_found_through_gate_reordering(tmp_path):
    torch.manual_seed(0)
    from export_models import LSTMClassifier

    model = LSTMClassifier(hidden=32).eval()
    masks = random_masks(model, 0.9)
    r = export_onnx(model, tmp_path / "l.onnx", torch.randn(4, 5, 6), masks=masks, latency=False)
    rows = {t["name"]: t["stored_as"] for t in r["tensors"]}
    assert rows["lstm.weight_ih_l0"] == rows["lstm.weight_hh_l0"] == "packed"


def test_receipt_latency_block(tmp_path):
    model, masks, x = make_mlp().eval(), None, torch.randn(4, 20)
    r = export_onnx(model, tmp_path / "m.onnx", x, storage="dense", masks=masks)
    lat = r["latency"]
    assert set(lat) == {"onnxruntime_dense", "pytorch"}
    for runner in lat.values():
        assert runner["batch1"]["p90_ms"] >= runner["batch1"]["p50_ms"] > 0
        assert runner["batch64"]["p50_ms"] > 0
    assert r["session_creation_s"] > 0


def test_dynamo_exporter(tmp_path):
    model = make_mlp().eval()
    masks = random_masks(model, 0.9)
    r = export_onnx(model, tmp_path / "d.onnx", torch.randn(1, 20), masks=masks,
                    verify_inputs=torch.randn(9, 20), exporter="dynamo", latency=False)  # fmt: skip
    assert r["exporter"] == "dynamo" and r["verification"]["max_abs_diff"] <= 1e-5
    assert {t["stored_as"] for t in r["tensors"]} <= {"packed", "dense"}
    assert any(t["stored_as"] == "packed" for t in r["tensors"])


def test_falls_back_to_other_exporter_and_names_it(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' is not supported")

    real = exporters_mod._RUNNERS["torchscript"]
    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", broken)
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", real)  # fast stand-in
    r = export_onnx(make_mlp().eval(), tmp_path / "f.onnx", torch.randn(2, 20), latency=False)
    assert r["exporter"] == "dynamo"
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", broken)
    with pytest.raises(ModelError, match="frobnicate"):
        export_onnx(make_mlp().eval(), tmp_path / "g.onnx", torch.randn(2, 20), latency=False)
    assert not (tmp_path / "g.onnx").exists()


def test_masks_none_reads_zeros(tmp_path):
    model = make_mlp().eval()
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.15] = 0
    r = export_onnx(model, tmp_path / "z.onnx", torch.randn(3, 20), latency=False, cleanup=False)
    row = next(t for t in r["tensors"] if t["name"] == "0.weight")
    assert row["sparsity"] == pytest.approx(float((model[0].weight == 0).float().mean()))
    assert isinstance(model[1], nn.Tanh)
