"""A user model that loops nn.LSTMCell/GRUCell/RNNCell over time prunes end to end (issue 15):
`--include 'cell.*'` finds the cell weights, EKFAC gives them the diagonal Fisher, and the
report has their per-gate sparsity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.data import load_data

GATES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "new")}


class CellLoop(nn.Module):
    """Reads 8x8 digits row by row with a single-step cell, classifies from the last h."""

    def __init__(self, kind: str, hidden: int = 16):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        make = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind]
        self.cell = make(8, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        rows = x.reshape(x.shape[0], 8, 8)
        h = rows.new_zeros(rows.shape[0], self.hidden)
        c = rows.new_zeros(rows.shape[0], self.hidden)
        for t in range(8):
            if self.kind == "lstm":
                h, c = self.cell(rows[:, t], (h, c))
            else:
                h = self.cell(rows[:, t], h)
        return self.head(h)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_include_finds_cell_weights_and_the_report_has_their_gates(kind, digits):
    torch.manual_seed(0)
    model = CellLoop(kind)
    result = prunekit.prune(
        model, digits, include=("cell.*",), criterion="obd", sparsity=0.6, steps=2,
        finetune_epochs=0.2, final_epochs=0.2, score_examples=64, ntk=False, lr=0.01,
    )  # fmt: skip
    report = result.report
    names = {"cell.weight_ih", "cell.weight_hh"}
    assert set(result.masks) == names
    assert report["estimators"] == dict.fromkeys(names, "diag")  # EKFAC falls back
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    assert report["sparsity"]["global"] == pytest.approx(round(0.6 * total) / total)
    for name in names:
        assert bool((params[name][~result.masks[name]] == 0).all())
    per_gate = report["sparsity"]["per_gate"]
    if kind == "rnn":
        assert per_gate == {}  # no gates
        return
    assert set(per_gate) == names
    for name in names:
        assert tuple(per_gate[name]) == GATES[kind]
        rows = result.masks[name].reshape(len(GATES[kind]), 16, -1)
        for gate, block in zip(GATES[kind], rows, strict=True):
            assert per_gate[name][gate] == pytest.approx(float((~block).float().mean()))
