"""KFAC factors against their definitions (float64 oracles from torch.func)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.criteria import fit_diag, fit_kfac
from prunekit.errors import SettingError
from prunekit.prune.targets import find_targets
from prunekit.types import RegressionTask

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles", Path(__file__).with_name("kfac_oracles.py")
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)

MODELS = {"mlp": orc.tiny_mlp, "cnn": orc.tiny_cnn, "cnn1d": orc.tiny_cnn1d}


@pytest.mark.parametrize("labels", ["exact", "empirical"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_factors_equal_their_definitions(arch, labels):
    model = MODELS[arch]()
    x, y = orc.data(model, 5)
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x, y)], labels=labels)
    assert set(kfac.estimators().values()) == {"kfac"}
    for name in orc.layer_names(model):
        a, g = orc.factor_oracle(model, x, y, labels, name)
        torch.testing.assert_close(kfac.A[f"{name}.weight"], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kfac.G[f"{name}.weight"], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_one_example_kron_equals_dense_block(labels):
    # Row-major vec of [W | b]: the per-example gradient g a^T has vec kron(g, a), so for a
    # Linear layer on one example the Fisher block is exactly kron(G, A), whatever the
    # number of label terms (a does not depend on the label).
    model = orc.tiny_mlp()
    x, y = orc.data(model, 1)
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x, y)], labels=labels)
    diag, bias_diag = kfac.diagonal(), kfac.bias_diagonal()
    for name in orc.layer_names(model):
        t = f"{name}.weight"
        dense = orc.dense_fisher(model, x, y, labels, name)[0]
        kron = torch.kron(kfac.G[t][0], kfac.A[t][0])
        torch.testing.assert_close(kron, dense, rtol=1e-9, atol=1e-12)
        cols = kfac.layers[t].cols
        dense_diag = dense.diagonal().reshape(-1, cols)
        has_bias = model.get_submodule(name).bias is not None
        torch.testing.assert_close(diag[t], dense_diag[:, : cols - has_bias])
        if has_bias:
            torch.testing.assert_close(bias_diag[f"{name}.bias"], dense_diag[:, -1])
        else:
            assert f"{name}.bias" not in bias_diag


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_batch_size_invariance(arch):
    model = MODELS[arch]()
    x, y = orc.data(model, 6)
    targets = find_targets(model)
    whole = fit_kfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    ones = fit_kfac(
        model, orc.TASK, targets, [(x[i : i + 1], y[i : i + 1]) for i in range(6)], labels="exact"
    )
    uneven = fit_kfac(
        model, orc.TASK, targets, iter([(x[:4], y[:4]), (x[4:], y[4:])]), labels="exact"
    )
    for other in (ones, uneven):
        assert other.examples == 6
        for t in whole.layers:
            torch.testing.assert_close(other.A[t], whole.A[t], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(other.G[t], whole.G[t], rtol=1e-10, atol=1e-13)


def test_sampled_labels_are_reproducible_and_unbiased():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 4)
    targets = find_targets(model)
    state = torch.get_rng_state()
    one = fit_kfac(model, orc.TASK, targets, [(x, y)], generator=torch.Generator().manual_seed(3))
    two = fit_kfac(model, orc.TASK, targets, [(x, y)], generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    # 500 copies x 8 samples = 4000 draws per example in 8 backward passes; copies do not
    # change the expectation (per-example semantics).
    many = fit_kfac(model, orc.TASK, targets, [(x.repeat(500, 1), y.repeat(500))], samples=8)
    exact = fit_kfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    for t in one.layers:
        assert torch.equal(one.G[t], two.G[t])
        # Monte Carlo with 4000 draws: within a few percent of the expectation.
        err = (many.G[t] - exact.G[t]).norm() / exact.G[t].norm()
        assert err < 0.08, (t, float(err))


def test_unfactorable_targets_fall_back_to_diag():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same"), nn.Flatten(), nn.Linear(3 * 7 * 7, 3)
    ).double()
    x, y = orc.data(orc.tiny_cnn(), 3)
    targets = find_targets(model)
    kfac = fit_kfac(model, orc.TASK, targets, iter([(x, y)]), labels="exact")
    assert kfac.estimators() == {"0.weight": "diag", "2.weight": "kfac"}
    ref = fit_diag(model, orc.TASK, {"0.weight": targets["0.weight"]}, [(x, y)], labels="exact")
    torch.testing.assert_close(kfac.diagonal()["0.weight"], ref.diagonal()["0.weight"])
    assert kfac.diagonal()["2.weight"].shape == (3, 147)
    inv = kfac.inverse_diagonal(damping=0.1)
    assert set(inv) == set(targets) and all(bool((v > 0).all()) for v in inv.values())


def test_exact_labels_need_classification():
    model = orc.tiny_mlp()
    x, _ = orc.data(model, 2)
    with pytest.raises(SettingError, match="exact"):
        fit_kfac(
            model, RegressionTask(), find_targets(model), [(x, torch.zeros(2, 3))], labels="exact"
        )
    with pytest.raises(SettingError, match="labels"):
        fit_kfac(model, orc.TASK, find_targets(model), [(x, torch.zeros(2))], labels="true")


def test_float32_model_accumulates_in_float32():
    model = orc.tiny_mlp().float()
    x, y = orc.data(orc.tiny_mlp(), 3)
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x.float(), y)])
    assert all(a.dtype == torch.float32 for a in kfac.A.values())
    assert kfac.diagonal()["0.weight"].dtype == torch.float32
