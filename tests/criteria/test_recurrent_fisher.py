"""Diagonal Fisher of recurrent targets (nn.LSTM/GRU, BN-LSTM, BN-RNN) vs float64 oracles.

Oracles use torch.func only, one example at a time (vmap cannot batch the fused recurrent
kernels): per-example gradients by ``grad`` of a functional_call, the true Fisher as
diag(J^T (diag p - p p^T) J) with J's rows from ``vjp`` per class.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

import prunekit.criteria.fisher as fisher
from prunekit.criteria import fit_diag
from prunekit.criteria.unrolled import PlainCell, UnrolledRNN, functional_twin
from prunekit.models import lstm
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

CLS = ClassificationTask()


def model_of(cell: str) -> nn.Module:
    torch.manual_seed(0)
    # gamma 1: the paper's 0.1 makes the recurrent Fisher tiny, a weak test
    model = lstm(input_size=3, hidden=4, classes=3, cell=cell, rows=4, gamma=1.0).double().eval()
    if cell in ("bnlstm", "bnrnn"):  # non-trivial population statistics
        g = torch.Generator().manual_seed(1)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model


def data(n: int = 6, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,))


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def empirical_oracle(model, x, y):
    p = params_of(model)

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = [grad(loss)(p, xi, yi) for xi, yi in zip(x, y, strict=True)]
    return {k: torch.stack([g[k] for g in grads]).pow(2).mean(0) for k in p}


def true_fisher_oracle(model, x):
    p = params_of(model)
    out = {k: torch.zeros_like(v) for k, v in p.items()}
    for xi in x:
        logits, pull = vjp(lambda q, xi=xi: functional_call(model, q, (xi[None],))[0], p)
        prob = torch.softmax(logits, -1)
        rows = [pull(torch.eye(len(prob), dtype=logits.dtype)[c])[0] for c in range(len(prob))]
        h = torch.diag(prob) - torch.outer(prob, prob)
        for k in p:
            j = torch.stack([r[k].reshape(-1) for r in rows])  # (C, P_k)
            out[k] += torch.einsum("cp,cd,dp->p", j, h, j).reshape(p[k].shape)
    return {k: v / len(x) for k, v in out.items()}


def assert_close(got, want, names):
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-13, msg=n)
        assert float(want[n].abs().max()) > 1e-8, n  # non-trivial oracle


CELLS = ["lstm", "gru", "bnlstm", "bnrnn"]


@pytest.mark.parametrize("cell", CELLS)
def test_empirical_diag_of_recurrent_targets_equals_the_oracle(cell):
    model = model_of(cell)
    x, y = data()
    targets = find_targets(model)
    assert sum(t.kind == "recurrent" for t in targets.values()) == 2
    diag = fit_diag(model, CLS, targets, [(x[:4], y[:4]), (x[4:], y[4:])], labels="empirical")
    assert_close(diag.values, empirical_oracle(model, x, y), targets)


@pytest.mark.parametrize("cell", CELLS)
def test_exact_diag_of_recurrent_targets_equals_the_true_fisher(cell):
    model = model_of(cell)
    x, y = data()
    targets = find_targets(model)
    diag = fit_diag(model, CLS, targets, [(x, y)], labels="exact")
    assert_close(diag.values, true_fisher_oracle(model, x), targets)


@pytest.mark.parametrize("cell", ["lstm", "bnlstm"])
def test_vmap_path_runs_and_equals_the_per_example_loop(cell, monkeypatch):
    """The fast path really runs on recurrent models (no silent fallback) and agrees with
    the loop it replaces, for sampled labels too."""
    model = model_of(cell)
    x, y = data(5)
    targets = find_targets(model)
    names = [n for n, t in targets.items() if t.kind == "recurrent"]
    params = dict(model.named_parameters())
    sets = [torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    fast = fisher._vmap_sq_grads(model, CLS, (x, y), sets, names, params)

    def broken(*args):
        raise RuntimeError("vmap unavailable")

    monkeypatch.setattr(fisher, "_vmap_sq_grads", broken)
    slow = {n: torch.zeros_like(params[n]) for n in names}
    with torch.enable_grad():
        fisher._loop_sq_grads(model, CLS, (x, y), sets, names, params, slow)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
        (nn.LSTM, {"proj_size": 2, "batch_first": True}),
        (nn.GRU, {"num_layers": 2, "batch_first": True, "bias": False}),
        (nn.RNN, {"nonlinearity": "relu", "bidirectional": True}),
        (nn.RNN, {"num_layers": 2}),
    ],
)
def test_unrolled_twin_computes_what_the_fused_kernel_computes(cls, kwargs):
    torch.manual_seed(0)
    rnn = cls(3, 5, **kwargs).double().eval()
    twin = UnrolledRNN(rnn)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in rnn.named_parameters()]
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    for args in ((x,), (x[0],)):  # batched and unbatched
        want, got = rnn(*args), twin(*args)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.utils._pytree.tree_leaves(got[1]),
                        torch.utils._pytree.tree_leaves(want[1]), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_functional_twin_leaves_the_model_alone():
    model = model_of("lstm")
    assert functional_twin(model_of("bnlstm")).__class__.__name__ == "SequenceClassifier"
    twin = functional_twin(model)
    assert isinstance(model.rnn, nn.LSTM) and isinstance(twin.rnn, UnrolledRNN)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    x, _ = data()
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------ nn.LSTMCell / GRUCell / RNNCell loops


class CellLoop(nn.Module):
    """A user model that loops a single-step cell over time, classified from the last h."""

    def __init__(self, kind: str, features: int = 3, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        make = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind]
        self.cell = make(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # (N, T, F)
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


def cell_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = CellLoop(kind).double().eval()
    with torch.no_grad():  # larger recurrent weights: a non-trivial Fisher
        model.cell.weight_hh.mul_(2.0)
    return model


CELL_KINDS = ["lstm", "gru", "rnn"]


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_weights_are_recurrent_targets(kind):
    targets = find_targets(cell_model(kind))
    assert {n: t.kind for n, t in targets.items()} == {
        "cell.weight_ih": "recurrent",
        "cell.weight_hh": "recurrent",
        "head.weight": "linear",
    }


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_diag_fisher_of_cell_weights_equals_the_float64_oracle(kind, labels):
    model = cell_model(kind)
    x, y = data()
    targets = find_targets(model)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    diag = fit_diag(model, CLS, targets, batches, labels=labels)
    want = empirical_oracle(model, x, y) if labels == "empirical" else true_fisher_oracle(model, x)
    assert_close(diag.values, want, targets)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_vmap_path_runs_and_equals_the_per_example_loop(kind, monkeypatch):
    """Cells go through their plain twins under vmap (the fused cell kernels raise there)."""
    model = cell_model(kind)
    assert isinstance(functional_twin(model).cell, PlainCell)
    x, y = data(5)
    names = ["cell.weight_ih", "cell.weight_hh"]
    params = dict(model.named_parameters())
    sets = [torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    fast = fisher._vmap_sq_grads(model, CLS, (x, y), sets, names, params)

    def broken(*args):
        raise RuntimeError("vmap unavailable")

    monkeypatch.setattr(fisher, "_vmap_sq_grads", broken)
    slow = {n: torch.zeros_like(params[n]) for n in names}
    with torch.enable_grad():
        fisher._loop_sq_grads(model, CLS, (x, y), sets, names, params, slow)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-10, atol=1e-14)
        assert float(slow[n].abs().max()) > 1e-8


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (nn.LSTMCell, {}),
        (nn.GRUCell, {"bias": False}),
        (nn.RNNCell, {"nonlinearity": "relu"}),
        (nn.RNNCell, {}),
    ],
)
def test_plain_cell_computes_what_the_fused_cell_computes(cls, kwargs):
    torch.manual_seed(0)
    cell = cls(3, 5, **kwargs).double()
    twin = PlainCell(cell)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in cell.named_parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    state = (
        (torch.randn(4, 5, dtype=torch.float64),) * 2
        if cls is nn.LSTMCell
        else torch.randn(4, 5, dtype=torch.float64)
    )
    for args in ((x,), (x, state), (x[0],)):  # zero state, given state, unbatched
        for a, b in zip(torch.utils._pytree.tree_leaves(twin(*args)),
                        torch.utils._pytree.tree_leaves(cell(*args)), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_kfac_and_ekfac_fall_back_to_diag_for_cell_weights(estimator):
    """KFAC/EKFAC factor the head and give the cell weights the diagonal estimator: same
    values as fit_diag with the same labels, and 'diag' in ``estimators()``."""
    from prunekit.criteria import fit_curvature

    model = cell_model("lstm")
    x, y = data()
    targets = find_targets(model)
    curv = fit_curvature(estimator, model, CLS, targets, [(x, y)], labels="empirical")
    assert curv.estimators() == {
        "cell.weight_ih": "diag",
        "cell.weight_hh": "diag",
        "head.weight": estimator,
    }
    oracle = empirical_oracle(model, x, y)
    assert_close(curv.diagonal(), oracle, ["cell.weight_ih", "cell.weight_hh"])
