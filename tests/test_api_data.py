"""The Python API uses exactly the data it is given (issue 15, item 12).

fisher_diagonal and score use every example passed, in order (no hidden validation split),
checked against float64 oracles built with torch.func on exactly those examples; prune
takes an explicit validation set and says in report['data'] where validation came from.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import prunekit
from prunekit.data import load_data
from prunekit.errors import DataError, SettingError
from prunekit.finetune import evaluate
from prunekit.types import ClassificationTask, LabelKey

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles_api", Path(__file__).parent / "criteria" / "kfac_oracles.py"
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)

SIZES = (7, 10, 13)  # three batches of uneven sizes: 30 examples
RTOL = 2e-4  # the API accumulates in float32; a lost 20% of the data is off by 20-80%


def _model() -> nn.Module:
    """The 6-5-4-3 tanh MLP of the KFAC oracles, in float32 (the API's data is float32)."""
    return orc.tiny_mlp(seed=0).float()


def _batches(seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """(inputs (n, 6) float32, labels (n,)) batches of SIZES; 30 examples in all."""
    x, y = orc.data(orc.tiny_mlp(), sum(SIZES), seed=seed)
    x = x.float()
    out, start = [], 0
    for n in SIZES:
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


def _all(batches) -> tuple[Tensor, Tensor]:
    """Every example of ``batches``, in order: x as float64, y."""
    return torch.cat([b[0] for b in batches]).double(), torch.cat([b[1] for b in batches])


def _weights(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in d.items() if k.endswith("weight")}


def _sq_grad_mean(model: nn.Module, x: Tensor, y: Tensor, labels: str) -> dict[str, Tensor]:
    """Float64 oracle: mean over examples of the sum over label terms of squared
    per-example gradients (exact: -sqrt(p_c) log p_c per class; empirical: CE with y)."""
    pgrads, _ = orc.per_example(model.double(), x, y, labels)  # (N, terms, *shape)
    return {k: g.pow(2).sum(1).mean(0) for k, g in pgrads.items()}


def _close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = RTOL) -> None:
    assert set(got) == set(_weights(want))
    for name, value in got.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), want[name], rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------ fisher_diagonal


@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_diag_equals_the_oracle_on_exactly_the_given_batches(labels):
    batches = _batches()
    got = prunekit.fisher_diagonal(_model(), iter(batches), estimator="diag", labels=labels)
    x, y = _all(batches)
    _close(got, _sq_grad_mean(_model(), x, y, labels))
    # the first 24 examples only when asked: an explicit cap, the first examples in order
    first = prunekit.fisher_diagonal(_model(), batches, "diag", labels, examples=24)
    _close(first, _sq_grad_mean(_model(), x[:24], y[:24], labels))


def test_sampled_diag_equals_the_empirical_oracle_on_the_keyed_labels():
    """Sampled labels: example i's label comes from LabelKey(seed).draws(i) whatever its
    batch, so the oracle draws them for all 30 examples at once."""
    batches = _batches()
    got = prunekit.fisher_diagonal(_model(), batches, "diag", "sampled", samples=2, seed=5)
    x, _ = _all(batches)
    with torch.no_grad():
        logits = _model().double()(x)
    task, key = ClassificationTask(), LabelKey(seed=5)
    ys = [task.sample_examples(logits, key.draws(0, len(x), s)) for s in range(2)]
    want = [_sq_grad_mean(_model(), x, y, "empirical") for y in ys]
    _close(got, {k: (want[0][k] + want[1][k]) / 2 for k in want[0]})


def test_kfac_diagonal_equals_the_factor_oracle_on_the_given_batches():
    """KFAC's diagonal: diag(G) diag(A)^T of the weight columns, A and G from their
    definitions (float64) on all 30 examples."""
    batches = _batches()
    got = prunekit.fisher_diagonal(_model(), batches, estimator="kfac", labels="exact")
    x, y = _all(batches)
    model = _model().double()
    want = {}
    for name in orc.layer_names(model):
        a, g = orc.factor_oracle(model, x, y, "exact", name)
        cols = model.get_submodule(name).in_features
        want[f"{name}.weight"] = torch.outer(g[0].diagonal(), a[0].diagonal()[:cols])
    _close(got, want)


def test_ekfac_diagonal_equals_the_projected_dense_fisher_on_the_given_batches():
    """EKFAC's diagonal: diag(Q diag(S) Q^T), S = diag(Q^T F Q), Q the Kronecker eigenbasis
    of the oracle's factors and F the dense float64 Fisher of all 30 examples."""
    batches = _batches()
    got = prunekit.fisher_diagonal(_model(), batches, estimator="ekfac", labels="exact")
    x, y = _all(batches)
    model = _model().double()
    want = {}
    for name in orc.layer_names(model):
        a, g = orc.factor_oracle(model, x, y, "exact", name)
        q = orc.kron_basis(torch.linalg.eigh(g)[1], torch.linalg.eigh(a)[1])[0]
        dense = orc.dense_fisher(model, x, y, "exact", name)[0]
        scale = (q.T @ dense @ q).diagonal()
        diag = ((q * scale) @ q.T).diagonal()
        module = model.get_submodule(name)
        cols = module.in_features + (module.bias is not None)
        want[f"{name}.weight"] = diag.reshape(-1, cols)[:, : module.in_features]
    _close(got, want, rtol=2e-3)  # eigenvectors of float32 factors


def test_the_batching_of_the_data_never_changes_the_fisher():
    """Same examples, other batches (one batch, batches of one): the same diagonal, for
    sampled labels too (labels keyed by example index, not batch)."""
    batches = _batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ones = [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    for estimator in ("diag", "ekfac"):
        kw = {"estimator": estimator, "labels": "sampled", "seed": 3}
        a = prunekit.fisher_diagonal(_model(), batches, **kw)
        b = prunekit.fisher_diagonal(_model(), [(x, y)], **kw)
        c = prunekit.fisher_diagonal(_model(), ones, **kw)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(c[name], a[name], rtol=1e-5, atol=1e-9)


def test_a_bad_example_cap_is_a_setting_error():
    with pytest.raises(SettingError, match="examples 0 must be an integer >= 1"):
        prunekit.fisher_diagonal(_model(), _batches(), examples=0)


# ------------------------------------------------------------------ score


def _mean_grad_oracle(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    net = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.mean(0) for k, g in grads.items()}


def test_lm_score_is_the_oracle_gradient_on_every_example():
    """lm = |g theta| with g the mean gradient over ALL the examples: changing the last
    example changes the score; with examples=29 it does not."""
    model, batches = _model(), _batches()
    got = prunekit.score(model, batches, criterion="lm")
    x, y = _all(batches)
    g = _mean_grad_oracle(model, x, y)
    params = dict(model.named_parameters())
    want = {n: (g[n] * params[n].detach().double()).abs() for n in got}
    _close(got, want)
    changed = [*batches[:-1], (batches[-1][0].clone(), batches[-1][1].clone())]
    changed[-1][0][-1] += 1.0
    changed[-1][1][-1] = (changed[-1][1][-1] + 1) % 3
    other = prunekit.score(model, changed, criterion="lm")
    assert any(not torch.equal(other[n], got[n]) for n in got)
    capped = prunekit.score(model, batches, criterion="lm", examples=29)
    capped_changed = prunekit.score(model, changed, criterion="lm", examples=29)
    assert all(torch.equal(capped[n], capped_changed[n]) for n in got)


def test_score_obd_uses_the_same_fisher_as_fisher_diagonal():
    model, batches = _model(), _batches()
    scores = prunekit.score(model, batches, criterion="obd", fisher="diag", labels="sampled")
    fisher = prunekit.fisher_diagonal(model, batches, "diag", "sampled")
    params = dict(model.named_parameters())
    for name, s in scores.items():
        want = 0.5 * fisher[name] * params[name].detach() ** 2
        torch.testing.assert_close(s, want, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ prune(val=...)

FAST = {"steps": 1, "finetune_epochs": 0, "final_epochs": 0, "score_examples": 100}


def _digits_batches(x: Tensor, y: Tensor, size: int = 64) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_prune_with_val_evaluates_on_it_and_reports_the_split(digits_model_file):
    from prunekit.checkpoint import load_model

    data = load_data("digits", seed=0)
    train = _digits_batches(data.x_train[:600], data.y_train[:600])
    val = _digits_batches(data.x_val[:150], data.y_val[:150], size=50)
    model = load_model(digits_model_file).model
    dense = evaluate(copy.deepcopy(model), ClassificationTask(), val)
    result = prunekit.prune(model, train, val=iter(val), criterion="magnitude", ntk=False, **FAST)
    assert result.report["data"] == {"split": "explicit", "train": 600, "val": 150}
    got = result.report["metrics"]["dense"]
    assert got["loss"] == pytest.approx(dense["loss"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(dense["accuracy"], abs=1e-12)
    # without val: a seeded 80/20 split of the batches, said so
    model = load_model(digits_model_file).model
    split = prunekit.prune(model, train, criterion="magnitude", ntk=False, seed=4, **FAST)
    assert split.report["data"] == {"split": "random 80/20 (seed 4)", "train": 480, "val": 120}


def test_prune_spec_string_reports_its_documented_split(digits_model_file):
    from prunekit.checkpoint import load_model

    model = load_model(digits_model_file).model
    result = prunekit.prune(model, "digits", criterion="magnitude", ntk=False, **FAST)
    data = load_data("digits", seed=0)
    want = {"split": "random 80/20 (seed 0)", "train": data.n_train, "val": data.n_val}
    assert result.report["data"] == want
    with pytest.raises(SettingError, match="val= is for data given as batches"):
        prunekit.prune(model, "digits", val=[data.x_val], criterion="magnitude", **FAST)


def test_val_batches_must_have_the_form_of_the_data():
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    with pytest.raises(DataError, match="data batches are .inputs, targets. pairs but val"):
        prunekit.prune(_model(), [(x, y)], val=[x[:5]], criterion="magnitude", **FAST)
    with pytest.raises(DataError, match="val holds no batches"):
        prunekit.prune(_model(), [(x, y)], val=[], criterion="magnitude", **FAST)
