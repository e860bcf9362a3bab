"""Verification failures leave nothing behind; bad input is refused before writing; receipt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_models import make_mlp, random_masks
from onnx import numpy_helper

from prunekit.errors import RunDirError, SettingError, VerificationError
from prunekit.export import core, export_onnx, receipt_path, receipt_table, write_receipt


def _corrupting(real):
    """apply_storage that then flips one stored value (a corrupt weight)."""

    def wrapped(model, candidates, storage, quantize):
        rows = real(model, candidates, storage, quantize)
        for i, init in enumerate(model.graph.initializer):
            if init.name.endswith("__pk_values") or init.name == candidates[0].onnx_name:
                arr = numpy_helper.to_array(init).copy()
                arr[np.flatnonzero(arr)[0]] += 0.5
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
                break
        return rows

    return wrapped


@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_corrupt_weight_raises_and_leaves_no_file(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "apply_storage", _corrupting(core.apply_storage))
    model = make_mlp().eval()
    path = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="max abs diff") as info:
        export_onnx(model, path, torch.randn(8, 20), storage=storage,
                    masks=random_masks(model, 0.9), latency=False)  # fmt: skip
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_decoded_weight_mismatch_is_caught(tmp_path, monkeypatch):
    """Even with output parity, a decoded weight that differs from the pruned one fails."""
    real = core.decoded_value
    monkeypatch.setattr(core, "decoded_value", lambda a, s, ax: real(a, s, ax) * 1.5)
    model = make_mlp().eval()
    with pytest.raises(VerificationError, match="decoded weight"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(4, 20),
                    masks=random_masks(model, 0.9), latency=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_bad_input_refused_before_writing(tmp_path):
    model, x = make_mlp().eval(), torch.randn(2, 20)
    with pytest.raises(RunDirError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", x, latency=False)
    (tmp_path / "old.onnx").write_bytes(b"keep me")
    with pytest.raises(RunDirError, match="already exists"):
        export_onnx(model, tmp_path / "old.onnx", x, overwrite=False, latency=False)
    assert (tmp_path / "old.onnx").read_bytes() == b"keep me"
    with pytest.raises(SettingError, match="dense, packed, sparse"):
        export_onnx(model, tmp_path / "a.onnx", x, storage="csr", latency=False)
    with pytest.raises(SettingError, match="int8"):
        export_onnx(model, tmp_path / "a.onnx", x, quantize="fp4", latency=False)
    with pytest.raises(SettingError, match="use storage packed"):
        export_onnx(model, tmp_path / "a.onnx", x, storage="sparse", quantize="int8")
    with pytest.raises(SettingError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", x, quantize="int8", opset=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_receipt_json_and_table(tmp_path):
    model = make_mlp().eval()
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    r = export_onnx(model, tmp_path / "m.onnx", x, quantize="int8-weights",
                    masks=random_masks(model, 0.9), verify_targets=y)  # fmt: skip
    out = write_receipt(r, receipt_path(tmp_path / "m.onnx"))
    assert out == tmp_path / "m.onnx.json"
    loaded = json.loads(out.read_text())
    assert loaded["storage"] == "packed" and loaded["quantize"] == "int8-weights"
    assert loaded["bytes"]["file"] == (tmp_path / "m.onnx").stat().st_size
    assert "densely in memory" in loaded["memory_note"]
    rows = receipt_table(r)
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in rows)
    labels = dict(rows)
    assert labels["storage"] == "packed + int8-weights" and "accuracy change" in labels
    assert "onnxruntime_packed batch64 p50/p90" in labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
