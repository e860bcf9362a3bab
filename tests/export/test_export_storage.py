"""Packed encoding and in-graph decoding, exact on edge cases; mode/setting validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from prunekit.errors import SettingError
from prunekit.export import QUANTIZE_MODES, STORAGE_MODES, check_modes, pack, unpack
from prunekit.export.graph import packed_subgraph
from prunekit.export.storage import check_opset, dequantize_int8, quantize_int8


def _edge_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((7, 9)).astype(np.float32)
    sparse = dense * (rng.random((7, 9)) < 0.1)
    long_gap = np.zeros((3, 700), np.float32)
    long_gap[0, 0] = 1.5
    long_gap[2, 699] = -2.0  # gap of 2098 positions: 8 filler entries
    empty_rows = sparse.copy()
    empty_rows[[0, 3, 6]] = 0
    ends = np.zeros(1000, np.float32)
    ends[[0, 999]] = [3.0, 4.0]  # first and last element
    return {
        "all_zero": np.zeros((4, 5), np.float32),
        "dense_0pct": dense,
        "sparse_90pct": sparse,
        "gap_over_255": long_gap,
        "empty_rows": empty_rows,
        "first_last": ends,
        "only_last": np.eye(1, 600, 599, dtype=np.float32).ravel(),
    }


CASES = _edge_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_pack_roundtrip_exact(case):
    array = CASES[case]
    deltas, values = pack(array)
    assert deltas.dtype == np.uint8 and values.dtype == np.float32
    assert deltas.size == values.size >= np.count_nonzero(array)
    positions = np.cumsum(deltas.astype(np.int64))
    assert np.all(np.diff(positions) > 0)  # no duplicate scatter positions
    assert positions.size == 0 or positions[-1] < array.size
    np.testing.assert_array_equal(unpack(deltas, values, array.size), array.ravel())


def test_long_gap_uses_fillers():
    deltas, values = pack(CASES["gap_over_255"])
    assert deltas.size == 2 + (2098 - 1) // 255  # two non-zeros plus fillers
    assert np.count_nonzero(values) == 2


def _decode_model(array: np.ndarray, axis=None, dequant="mul") -> onnx.ModelProto:
    nodes, inits, _ = packed_subgraph("W", array, axis, dequant)
    out = helper.make_tensor_value_info("W", TensorProto.FLOAT, list(array.shape))
    graph = helper.make_graph(nodes, "decode", [], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_decoder_exact_in_onnxruntime_and_reference(case):
    array = CASES[case]
    model = _decode_model(array)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {})[0], array)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {})[0], array)


@pytest.mark.parametrize("dequant", ["mul", "dequantizelinear"])
@pytest.mark.parametrize("axis", [0, 1])
def test_int8_decoder_matches_numpy_and_keeps_zeros(dequant, axis):
    array = CASES["sparse_90pct"] * 3
    sess = ort.InferenceSession(
        _decode_model(array, axis, dequant).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    got = sess.run(None, {})[0]
    q, scales = quantize_int8(array, axis)
    np.testing.assert_array_equal(got, dequantize_int8(q, scales, axis))
    assert np.all(got[array == 0] == 0)
    # per-channel symmetric int8: error at most half a step of that channel
    step = np.expand_dims(scales, 1 - axis)
    assert np.all(np.abs(got - array) <= step / 2 + 1e-7)


@pytest.mark.parametrize(
    "storage,quantize,needle",
    [("csr", None, "dense, packed, sparse"), ("packed", "int4", "int8"),
     ("dense", "int8", "packed"), ("sparse", "int8", "packed"),
     ("dense", "int8-weights", "packed"), ("sparse", "int8-static", "packed")],
)  # fmt: skip
def test_bad_modes_raise_setting_error_naming_valid(storage, quantize, needle):
    with pytest.raises(SettingError, match=needle):
        check_modes(storage, quantize)


def test_modes_registry_and_opset_floor():
    assert STORAGE_MODES == ("dense", "sparse", "packed")
    assert QUANTIZE_MODES == ("int8", "int8-dynamic", "int8-static", "int8-weights")
    for mode in QUANTIZE_MODES:
        check_modes("packed", mode)
        with pytest.raises(SettingError, match=">= 13"):
            check_opset(12, "packed", mode)
    with pytest.raises(SettingError, match=">= 13"):
        check_opset(12, "packed", "int8")
    with pytest.raises(SettingError, match=">= 11"):
        check_opset(9, "packed", None)
