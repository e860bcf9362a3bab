"""ONNX export of the recurrent zoo: LSTM/GRU as ONNX ops, BN-LSTM unrolled to T_max."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from prunekit.export import export_onnx
from prunekit.models import lstm
from prunekit.prune.targets import find_targets


def pruned_model(cell: str):
    torch.manual_seed(0)
    model = lstm(input_size=6, hidden=8, classes=4, cell=cell, rows=5).eval()
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=gen) > 0.8 for n in find_targets(model)}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
        for name, buf in model.named_buffers():  # per-step statistics that differ per step
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.5)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.3)
    return model, masks


@pytest.mark.parametrize(("cell", "op"), [("lstm", "LSTM"), ("gru", "GRU"), ("bnlstm", None)])
def test_recurrent_export_parity(cell, op, tmp_path):
    model, masks = pruned_model(cell)
    x = torch.randn(16, 1, 5, 6)  # images read row by row: T = 5 = T_max
    path = tmp_path / f"{cell}.onnx"
    receipt = export_onnx(model, path, x[:4], masks=masks, verify_inputs=x, latency=False)
    ver = receipt["verification"]
    assert ver["max_abs_diff"] <= 1e-5 and ver["n_inputs"] == 16
    assert ver["weights"]["zeros"] >= ver["weights"]["pruned"] > 0
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if op is not None:
        assert op in ops  # the fused ONNX recurrent op, not an unrolled loop
    else:
        assert "LSTM" not in ops and "Loop" not in ops and "Scan" not in ops  # unrolled


def test_bnlstm_export_carries_per_step_statistics(tmp_path):
    """The exported graph really uses step t's statistics: zeroing one step's table in the
    PyTorch model changes the PyTorch output, and the export of the changed model follows."""
    import onnxruntime as ort

    model, masks = pruned_model("bnlstm")
    x = torch.randn(8, 1, 5, 6)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(model, a, x, masks=masks, latency=False, storage="dense")
    with torch.no_grad():
        model.rnn.cell.bn_c.running_mean[4].add_(5.0)  # the last step only
    export_onnx(model, b, x, masks=masks, latency=False, storage="dense")
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()}
        )[0]
        for p in (a, b)
    ]
    assert float(np.abs(runs[0] - runs[1]).max()) > 1e-3


class CellLoop(torch.nn.Module):
    """A user model looping nn.LSTMCell/GRUCell/RNNCell over the rows of an image."""

    def __init__(self, kind: str, features: int = 6, hidden: int = 8, classes: int = 4):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        make = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}
        self.cell = make[kind](features, hidden)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):  # (N, 1, T, F): rows are time steps
        x = x.flatten(1, 2)
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_cell_loop_export_matches_onnxruntime(kind, storage, tmp_path):
    """A model that loops a cell over time (unrolled to T by the exporter) exports with its
    cell weights pruned; onnxruntime matches PyTorch at another batch size and the pruned
    cell weights are zeros in the graph."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = CellLoop(kind).eval()
    targets = find_targets(model)
    assert {targets[n].kind for n in ("cell.weight_ih", "cell.weight_hh")} == {"recurrent"}
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=gen) > 0.8 for n in targets}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    x = torch.randn(16, 1, 5, 6)
    path = tmp_path / f"{kind}-cell.onnx"
    receipt = export_onnx(model, path, x[:4], storage=storage, masks=masks, verify_inputs=x,
                          latency=False)  # fmt: skip
    ver = receipt["verification"]
    assert ver["max_abs_diff"] <= 1e-5 and ver["n_inputs"] == 16
    assert ver["weights"]["zeros"] >= ver["weights"]["pruned"] > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(7, 1, 5, 6)  # a batch size never seen by the exporter
    got = session.run(None, {"input": other.numpy()})[0]
    with torch.no_grad():
        want = model(other).numpy()
    assert float(np.abs(got - want).max()) <= 1e-5
