"""int8 compute (--quantize int8 / int8-dynamic / int8-static): integer ops in the written
graph, the fp32 vs int8 metric recomputed, refusal past --max-accuracy-drop, bad limits,
recurrent and encoder models."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_models import LSTMClassifier, make_cnn, make_mlp, random_masks
from test_encoder_export import _inputs, pruned_encoder
from torch import nn

from prunekit.errors import ModelError, SettingError
from prunekit.export import QuantizationRefused, check_accuracy_drop, export_onnx
from prunekit.export.int8 import compare, cosines
from prunekit.export.quantize import gemm_to_matmul, integer_ops
from prunekit.export.verify import feeds, run_torch


def _prune(model: nn.Module, sparsity: float) -> dict:
    masks = random_masks(model, sparsity)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return masks


def _run(path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds(sess, x))[0]


def _optimized_ops(path, tmp_path) -> set[str]:
    """Node types of the graph onnxruntime actually runs (after its fusions)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_mlp_int8_is_dynamic_integer_matmul_and_reports_the_recomputed_change(tmp_path):
    torch.manual_seed(0)
    model = make_mlp((20, 64, 32, 4)).eval()
    masks = _prune(model, 0.7)
    x = torch.randn(300, 20)
    y = torch.randint(0, 4, (300,))
    path = tmp_path / "q.onnx"
    r = export_onnx(model, path, x[:8], quantize="int8", masks=masks, verify_inputs=x,
                    verify_targets=y, max_accuracy_drop=50.0)  # fmt: skip
    q = r["quantization"]
    assert q["method"] == "dynamic" and q["calibration"] is None
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "Gemm" not in ops
    assert q["integer_ops"]["MatMulInteger"] == 3 and q["left_fp32"] == {}
    # the change, recomputed: int8 file vs the pruned PyTorch model (= fp32 graph, 1e-5)
    labels = y.numpy()
    fp32 = float((run_torch(model, x).argmax(-1) == labels).mean())
    int8 = float((_run(path, x).argmax(-1) == labels).mean())
    assert q["metric"] == "accuracy" and q["n_inputs"] == 300
    assert q["fp32"] == pytest.approx(fp32) and q["int8"] == pytest.approx(int8)
    assert q["change_points"] == pytest.approx(100 * (int8 - fp32))
    assert r["verification"]["max_abs_diff"] <= 1e-5  # the fp32 graph's exact parity
    assert 0 < q["max_abs_diff"] and q["cosine_mean"] >= 0.99  # int8 is lossy, but close
    w = r["verification"]["weights"]
    assert w["zeros"] >= w["pruned"] > 0  # symmetric int8: pruned zeros stay zero
    assert {t["stored_as"] for t in r["tensors"]} <= {"int8", "packed-int8"}
    assert set(q["latency_ratio"]) == {"batch1", "batch64"}
    assert set(r["latency"]) == {"onnxruntime_packed", "onnxruntime_dense", "pytorch"}
    assert q["bytes"]["int8_file"] == path.stat().st_size
    assert "computes this model's MatMul/Gemm" in r["memory_note"]


def test_packed_int8_weights_are_smaller_and_fold_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_mlp((64, 128, 10)).eval()
    masks = _prune(model, 0.9)
    x = torch.randn(64, 64)
    r = export_onnx(model, tmp_path / "q.onnx", x[:4], quantize="int8-dynamic", masks=masks,
                    verify_inputs=x, latency=False)  # fmt: skip
    stored = {t["name"]: t["stored_as"] for t in r["tensors"]}
    assert stored["0.weight"] == "packed-int8"  # 90% zero: uint8 deltas + int8 values win
    assert r["quantization"]["bytes"]["int8_file"] < 0.35 * r["quantization"]["bytes"]["fp32_onnx"]
    assert r["verification"]["weights"]["zeros"] >= r["verification"]["weights"]["pruned"]


def test_cnn_with_batchnorm_int8_is_static_qdq_calibrated_and_fused(tmp_path):
    model = make_cnn()
    masks = _prune(model, 0.5)
    gen = torch.Generator().manual_seed(0)
    x, train = torch.randn(40, 1, 6, 6, generator=gen), torch.randn(400, 1, 6, 6, generator=gen)
    path = tmp_path / "c.onnx"
    r = export_onnx(model, path, x[:4], quantize="int8-static", masks=masks, verify_inputs=x,
                    calibration_inputs=train, seed=3, latency=False)  # fmt: skip
    q = r["quantization"]
    assert q["method"] == "static"
    assert q["calibration"] == {"examples": 256, "seed": 3, "source": "training inputs"}
    assert q["metric"] == "cosine" and q["fp32"] == 1.0  # no labels: cosine to fp32
    assert q["int8"] == pytest.approx(float(cosines(run_torch(model, x), _run(path, x)).mean()),
                                      abs=1e-5)  # fmt: skip
    assert q["change_points"] == pytest.approx(100 * (q["int8"] - 1.0))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(path).graph.node}
    assert "QLinearConv" in _optimized_ops(path, tmp_path)  # onnxruntime computes in int8
    assert q["left_fp32"] == {}
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(path).graph.node}


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_int8_on_a_cnn_is_dynamic_and_leaves_convolutions_fp32(tmp_path, mode):
    model = make_cnn()
    x = torch.randn(16, 1, 6, 6)
    r = export_onnx(model, tmp_path / "c.onnx", x[:4], quantize=mode, verify_inputs=x,
                    latency=False)  # fmt: skip
    assert r["quantization"]["method"] == "dynamic"
    assert r["quantization"]["integer_ops"] == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1}
    assert "Conv" in {n.op_type for n in onnx.load(tmp_path / "c.onnx").graph.node}
    assert r["quantization"]["left_fp32"] == {"Conv": 2}


def test_int8_on_a_conv_only_graph_falls_back_to_static(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(16, 1, 6, 6)
    r = export_onnx(model, tmp_path / "c.onnx", x[:4], quantize="int8", verify_inputs=x,
                    latency=False)  # fmt: skip
    assert r["quantization"]["method"] == "static"
    assert r["quantization"]["calibration"]["source"] == "validation inputs"


def _near_tie_model(features: int = 16) -> nn.Module:
    """Four nearly identical logits: int8 rounding flips many argmaxes."""
    torch.manual_seed(0)
    model = nn.Linear(features, 4)
    with torch.no_grad():
        base = torch.randn(1, features)
        model.weight.copy_(base + 1e-3 * torch.randn(4, features))
        model.bias.zero_()
    return model.eval()


def test_an_accuracy_drop_past_the_limit_refuses_and_writes_nothing(tmp_path):
    model = _near_tie_model()
    x = torch.randn(200, 16)
    y = torch.from_numpy(run_torch(model, x).argmax(-1))  # fp32 scores 1.0: int8 only loses
    with pytest.raises(QuantizationRefused) as err:
        export_onnx(model, tmp_path / "q.onnx", x[:4], quantize="int8", verify_inputs=x,
                    verify_targets=y, max_accuracy_drop=0)  # fmt: skip
    msg = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in msg
    assert "--max-accuracy-drop 0" in msg and "1.0000 fp32" in msg and "nothing written" in msg
    assert sorted(tmp_path.iterdir()) == []  # no file, no temp file, no receipt


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), True, "1"])
def test_bad_accuracy_drop_limits_exit_2_naming_the_value(bad, tmp_path):
    with pytest.raises(SettingError, match="max accuracy drop .* finite number of points >= 0"):
        check_accuracy_drop(bad)
    with pytest.raises(SettingError):
        export_onnx(make_mlp().eval(), tmp_path / "q.onnx", torch.randn(4, 20),
                    quantize="int8", max_accuracy_drop=bad)  # fmt: skip
    assert sorted(tmp_path.iterdir()) == []
    assert check_accuracy_drop(0) == 0.0 and check_accuracy_drop(2) == 2.0


def test_compare_metrics_against_a_float64_oracle():
    rng = np.random.default_rng(0)
    want = rng.normal(size=(50, 3)).astype(np.float32)
    got = want + rng.normal(scale=0.3, size=want.shape).astype(np.float32)
    labels = torch.from_numpy(rng.integers(0, 3, 50))
    out = compare(want, got, labels)
    fp32 = (want.argmax(1) == labels.numpy()).mean()
    int8 = (got.argmax(1) == labels.numpy()).mean()
    assert out["change_points"] == pytest.approx(100 * (int8 - fp32))
    a, b = want.astype(np.float64), got.astype(np.float64)
    oracle = [x @ y / math.sqrt((x @ x) * (y @ y)) for x, y in zip(a, b, strict=True)]
    assert out["cosine_mean"] == pytest.approx(np.mean(oracle), rel=1e-12)
    assert compare(want, got, None)["metric"] == "cosine"


def test_gemm_rewrite_keeps_the_function(tmp_path):
    model = make_mlp().eval()
    x = torch.randn(8, 20)
    r = export_onnx(model, tmp_path / "f.onnx", x, storage="dense", latency=False)
    proto = onnx.load(r["path"])
    assert gemm_to_matmul(proto) == 3 and not any(n.op_type == "Gemm" for n in proto.graph.node)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds(sess, x))[0]
    np.testing.assert_allclose(got, run_torch(model, x), atol=1e-5)
    assert integer_ops(proto) == {}


def test_lstm_quantizes_its_linear_head_and_keeps_the_lstm_fp32(tmp_path):
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    x = torch.randn(32, 5, 6)
    r = export_onnx(model, tmp_path / "l.onnx", x[:4], quantize="int8", verify_inputs=x,
                    verify_targets=torch.from_numpy(run_torch(model, x).argmax(-1)),
                    max_accuracy_drop=25.0, latency=False)  # fmt: skip
    ops = {n.op_type for n in onnx.load(tmp_path / "l.onnx").graph.node}
    assert "LSTM" in ops and "MatMulInteger" in ops
    assert r["quantization"]["left_fp32"] == {"LSTM": 1}  # said, not hidden
    assert r["quantization"]["metric"] == "accuracy"


def test_a_graph_with_nothing_to_quantize_is_refused_in_one_line(tmp_path):
    class Scale(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    with pytest.raises(ModelError, match="finds no MatMul node to quantize") as err:
        export_onnx(Scale(), tmp_path / "q.onnx", torch.randn(4, 3), quantize="int8")
    assert "\n" not in str(err.value) and sorted(tmp_path.iterdir()) == []


def test_encoder_int8_runs_at_another_length(tmp_path):
    model, masks = pruned_encoder()
    verify = _inputs(model, 16, 10, 1)
    targets = torch.from_numpy(run_torch(model, verify).argmax(-1))
    r = export_onnx(model, tmp_path / "e.onnx", _inputs(model, 2, 8, 0), quantize="int8",
                    masks=masks, verify_inputs=verify, verify_targets=targets,
                    max_accuracy_drop=30.0, latency=False)  # fmt: skip
    q, v = r["quantization"], r["verification"]
    assert q["method"] == "dynamic" and q["integer_ops"]["MatMulInteger"] >= 12
    assert q["metric"] == "accuracy" and q["fp32"] == 1.0
    assert v["max_abs_diff"] <= 1e-5 and "other_length" in v
    assert v["weights"]["zeros"] >= v["weights"]["pruned"] > 0


def test_int8_weights_limit_is_in_points_too(tmp_path):
    model = _near_tie_model(256)  # large enough that its int8 values are stored (smaller)
    x = torch.randn(200, 256)
    y = torch.from_numpy(run_torch(model, x).argmax(-1))
    with pytest.raises(QuantizationRefused, match="int8-weights export refused: .* points"):
        export_onnx(model, tmp_path / "w.onnx", x[:4], quantize="int8-weights", verify_inputs=x,
                    verify_targets=y, max_accuracy_drop=0, latency=False)  # fmt: skip
    assert sorted(tmp_path.iterdir()) == []
    r = export_onnx(model, tmp_path / "w.onnx", x[:4], quantize="int8-weights", verify_inputs=x,
                    verify_targets=y, max_accuracy_drop=100, latency=False)  # fmt: skip
    assert "quantization" not in r and r["verification"]["accuracy_pytorch"] == 1.0
