"""EKFAC against dense float64 oracles: scaling identity, diagonals, refit, no trace."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.criteria import (
    CRITERIA,
    EKFAC,
    EKFACBasis,
    fit_curvature,
    fit_ekfac,
    fit_kfac,
    make_criterion,
    refit_scaling,
)
from prunekit.criteria.ekfac import eigenbasis
from prunekit.errors import SettingError
from prunekit.prune.targets import find_targets

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles", Path(__file__).with_name("kfac_oracles.py")
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)

MODELS = {"mlp": orc.tiny_mlp, "cnn": orc.tiny_cnn, "cnn1d": orc.tiny_cnn1d}
CLOSE = {"rtol": 1e-9, "atol": 1e-12}


def _fit(arch, n=5, labels="exact", **kwargs):
    model = MODELS[arch]()
    x, y = orc.data(model, n)
    ekfac = fit_ekfac(model, orc.TASK, find_targets(model), [(x, y)], labels=labels, **kwargs)
    return model, x, y, ekfac


@pytest.mark.parametrize(
    ("arch", "labels"), [("mlp", "exact"), ("cnn", "empirical"), ("cnn1d", "exact")]
)
def test_scaling_is_the_fisher_projected_on_the_eigenbasis(arch, labels):
    # The identity that holds: S = diag(Q^T F Q) for the Fisher F of the same examples and
    # label terms (per-example gradients summed over positions before projecting).
    model, x, y, ekfac = _fit(arch, labels=labels)
    for name in orc.layer_names(model):
        t = f"{name}.weight"
        dense = orc.dense_fisher(model, x, y, labels, name)
        q = orc.kron_basis(ekfac.basis.u_g[t], ekfac.basis.u_a[t])
        projected = torch.diagonal(q.transpose(1, 2) @ dense @ q, dim1=1, dim2=2)
        torch.testing.assert_close(ekfac.scaling[t].reshape(projected.shape), projected, **CLOSE)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_diagonal_equals_dense_ekfac_diagonal_and_beats_kfac(arch):
    model, x, y, ekfac = _fit(arch)
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x, y)], labels="exact")
    diag, bias = ekfac.diagonal(), ekfac.bias_diagonal()
    for name in orc.layer_names(model):
        t, ly = f"{name}.weight", ekfac.layers[f"{name}.weight"]
        b = ekfac.basis
        dense_ek = orc.dense_from_scaling(b.u_g[t], ekfac.scaling[t], b.u_a[t])
        want = torch.diagonal(dense_ek, dim1=1, dim2=2).reshape(ly.groups, ly.rows, ly.cols)
        has_bias = ly.bias is not None
        torch.testing.assert_close(diag[t], want[..., : ly.cols - has_bias].reshape(ly.shape))
        if has_bias:
            torch.testing.assert_close(bias[ly.bias], want[..., -1].reshape(-1))
        # EKFAC's S is the Frobenius-optimal diagonal in the KFAC basis.
        dense = orc.dense_fisher(model, x, y, "exact", name)
        dense_kfac = torch.stack(
            [torch.kron(g, a) for g, a in zip(kfac.G[t], kfac.A[t], strict=True)]
        )
        assert (dense - dense_ek).norm() <= (dense - dense_kfac).norm() * (1 + 1e-12)


def test_kfac_scaling_reproduces_kfac():
    model, x, y, ekfac = _fit("cnn")
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x, y)], labels="exact")
    as_kfac = EKFAC(ekfac.basis, ekfac.basis.kfac_scaling(), None, "exact", 5)
    for t, want in kfac.diagonal().items():
        torch.testing.assert_close(as_kfac.diagonal()[t], want, **CLOSE)
    for t, want in kfac.inverse_diagonal(0.1).items():
        torch.testing.assert_close(as_kfac.inverse_diagonal(0.1)[t], want, **CLOSE)


def test_exact_when_the_fisher_is_diagonal_in_the_basis():
    # One example through a Linear layer: F = kron(G, A) is diagonal in Q, so EKFAC is the
    # Fisher block itself and its diagonal is the exact Fisher diagonal.
    model, x, y, ekfac = _fit("mlp", n=1)
    for name in orc.layer_names(model):
        t, ly = f"{name}.weight", ekfac.layers[f"{name}.weight"]
        dense = orc.dense_fisher(model, x, y, "exact", name)
        b = ekfac.basis
        torch.testing.assert_close(
            orc.dense_from_scaling(b.u_g[t], ekfac.scaling[t], b.u_a[t]), dense, **CLOSE
        )
        exact = dense[0].diagonal().reshape(ly.rows, ly.cols)[:, : ly.shape[1]]
        torch.testing.assert_close(ekfac.diagonal()[t], exact, **CLOSE)


@pytest.mark.parametrize(("damping", "absolute"), [(1e-3, 0.0), (0.5, 0.01)])
def test_inverse_diagonal_equals_dense_inverse(damping, absolute):
    model, x, y, ekfac = _fit("cnn")
    inv = ekfac.inverse_diagonal(damping, absolute)
    for t, ly in ekfac.layers.items():
        s = ekfac.scaling[t]
        lam = damping * float(s.mean()) + absolute
        dense = orc.dense_from_scaling(ekfac.basis.u_g[t], s, ekfac.basis.u_a[t])
        eye = torch.eye(dense.shape[-1], dtype=dense.dtype)
        want = torch.diagonal(torch.linalg.inv(dense + lam * eye), dim1=1, dim2=2)
        want = want.reshape(ly.groups, ly.rows, ly.cols)[..., : ly.cols - (ly.bias is not None)]
        torch.testing.assert_close(inv[t], want.reshape(ly.shape), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_batch_size_invariance(arch):
    model = MODELS[arch]()
    x, y = orc.data(model, 6)
    targets = find_targets(model)
    whole = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    ones = fit_ekfac(
        model,
        orc.TASK,
        targets,
        iter([(x[i : i + 1], y[i : i + 1]) for i in range(6)]),
        labels="exact",
    )
    assert ones.examples == whole.examples == 6
    for t, d in whole.diagonal().items():
        torch.testing.assert_close(ones.diagonal()[t], d, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_masked_weights_contribute_nothing(arch):
    model, x, y, ekfac = _fit(arch)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(0)
    masks = {t: torch.rand(tg.shape, generator=gen) > 0.4 for t, tg in targets.items()}
    refit = refit_scaling(ekfac, model, orc.TASK, targets, [(x, y)], labels="exact", masks=masks)
    pgrads, _ = orc.per_example(model, x, y, "exact")
    for name in orc.layer_names(model):
        t, ly = f"{name}.weight", ekfac.layers[f"{name}.weight"]
        assert refit.basis.u_a[t] is ekfac.basis.u_a[t]  # the basis is kept, not refit
        pgrads[t] = pgrads[t] * masks[t]
        blocks = orc.block_grads(model, pgrads, name)
        n, terms, grp = blocks.shape[:3]
        v = blocks.reshape(n * terms, grp, -1).transpose(0, 1)
        q = orc.kron_basis(ekfac.basis.u_g[t], ekfac.basis.u_a[t])
        want = ((v @ q).pow(2).sum(1) / n).reshape(grp, ly.rows, ly.cols)
        torch.testing.assert_close(refit.scaling[t], want, **CLOSE)
        assert not torch.allclose(refit.scaling[t], ekfac.scaling[t])


def test_refit_after_a_weight_change_keeps_basis_and_fits_new_scaling():
    model, x, y, ekfac = _fit("mlp")
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    refit = refit_scaling(
        ekfac.basis, model, orc.TASK, find_targets(model), [(x, y)], labels="exact"
    )
    dense = orc.dense_fisher(model, x, y, "exact", "0")
    q = orc.kron_basis(ekfac.basis.u_g["0.weight"], ekfac.basis.u_a["0.weight"])
    want = torch.diagonal(q.transpose(1, 2) @ dense @ q, dim1=1, dim2=2)
    torch.testing.assert_close(refit.scaling["0.weight"].reshape(want.shape), want, **CLOSE)


def test_basis_alone_has_no_diagonal():
    _, _, _, ekfac = _fit("mlp")
    assert isinstance(ekfac.basis, EKFACBasis)
    assert not hasattr(ekfac.basis, "diagonal")
    assert not hasattr(ekfac.basis, "inverse_diagonal")


def test_cache_keeps_the_basis_unless_due():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 4)
    targets = find_targets(model)
    fits = {}
    for every in (0, 1, 2):
        cache = {}
        bases = []
        for _ in range(3):
            curv = fit_curvature(
                "ekfac", model, orc.TASK, targets, [(x, y)], cache=cache, refit_basis_every=every
            )
            bases.append(curv.basis)
        fits[every] = [b is bases[0] for b in bases]
        assert cache["ekfac_step"] == 3
    assert fits[0] == [True, True, True]
    assert fits[1] == [True, False, False]
    assert fits[2] == [True, True, False]
    with pytest.raises(SettingError, match="refit_basis_every"):
        fit_curvature("ekfac", model, orc.TASK, targets, [(x, y)], cache={}, refit_basis_every=-1)


def test_cache_refits_the_basis_once_the_kept_weights_halved():
    """refit_basis_below 0.5: a new basis exactly when the nonzero target weights are at
    most half of those at the last fit (pruned weights are zeros in the model)."""
    model = orc.tiny_mlp()
    x, y = orc.data(model, 4)
    targets = find_targets(model)
    params = dict(model.named_parameters())
    flat = torch.cat([params[t].detach().flatten() for t in targets])
    order = flat.abs().argsort()  # zero the smallest first, as pruning would
    cache, bases, kept = {}, [], []
    for fraction in (1.0, 0.6, 0.51, 0.5, 0.3, 0.26, 0.24):
        with torch.no_grad():
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[order[flat.numel() - round(fraction * flat.numel()) :]] = True
            start = 0
            for t in targets:
                n = params[t].numel()
                params[t].mul_(keep[start : start + n].view_as(params[t]))
                start += n
        curv = fit_curvature(
            "ekfac", model, orc.TASK, targets, [(x, y)], cache=cache, refit_basis_below=0.5
        )
        bases.append(curv.basis)
        kept.append(cache["ekfac_kept"])
    new = [i == 0 or bases[i] is not bases[i - 1] for i in range(len(bases))]
    assert new == [True, False, False, True, False, False, True]
    assert kept[3] == pytest.approx(0.5, abs=0.02) and kept[6] == pytest.approx(0.24, abs=0.02)
    for bad in (-0.1, 1.0, float("nan"), "half", True):
        with pytest.raises(SettingError, match="refit_basis_below"):
            fit_curvature(
                "ekfac", model, orc.TASK, targets, [(x, y)], cache={}, refit_basis_below=bad
            )


def test_ekfac_is_the_default_for_obd_and_qm():
    for name in ("obd", "qm", "obs"):
        crit = make_criterion(name)
        assert crit.fisher == "ekfac" and crit.labels == "exact"
    assert make_criterion("obd", fisher="diag").labels == "exact"
    with pytest.raises(SettingError, match="Fisher estimator"):
        make_criterion("obd", fisher="dense")


@pytest.mark.parametrize("name", ["obs", "qm", "obd"])
def test_scoring_with_ekfac_leaves_no_trace(name):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    model.train()
    model[5].bias.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    x, y = orc.data(orc.tiny_cnn(), 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    crit = CRITERIA[name]()
    result = crit.evaluate(
        model,
        orc.TASK,
        find_targets(model),
        [(x[:5], y[:5]), (x[5:], y[5:])],
        generator=torch.Generator().manual_seed(1),
        cache={},
    )
    assert result.estimators == {"0.weight": "ekfac", "5.weight": "ekfac"}
    assert all(torch.isfinite(s).all() and s.dtype == torch.float32 for s in result.scores.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert not model[5].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_eigenbasis_is_orthonormal_and_diagonalises_the_factors():
    model = orc.tiny_cnn()
    x, y = orc.data(model, 5)
    kfac = fit_kfac(model, orc.TASK, find_targets(model), [(x, y)], labels="exact")
    basis = eigenbasis(kfac)
    for t in kfac.layers:
        u = basis.u_a[t]
        eye = torch.eye(u.shape[-1], dtype=u.dtype).expand_as(u)
        torch.testing.assert_close(u.transpose(1, 2) @ u, eye, **CLOSE)
        rebuilt = u @ torch.diag_embed(basis.lambda_a[t]) @ u.transpose(1, 2)
        torch.testing.assert_close(rebuilt, kfac.A[t], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("masked", [False, True])
def test_one_pass_equals_the_second_pass_route(arch, masked):
    # The rows kept from the factor pass give the same S as a second streamed pass, which
    # replays the same sampled labels; a budget that fits only some layers mixes the two.
    model = MODELS[arch]()
    x, y = orc.data(model, 7)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(5)
    masks = {t: torch.rand(tg.shape, generator=gen) > 0.5 for t, tg in targets.items()}
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]

    def fit(budget):
        return fit_ekfac(
            model,
            orc.TASK,
            targets,
            iter(batches),
            labels="sampled",
            samples=2,
            generator=torch.Generator().manual_seed(3),
            masks=masks if masked else None,
            cache_bytes=budget,
        )

    one, two, part = fit(2**30), fit(0), fit(1500)
    for t in one.layers:
        torch.testing.assert_close(one.scaling[t], two.scaling[t], **CLOSE)
        torch.testing.assert_close(part.scaling[t], two.scaling[t], **CLOSE)
    if masked:  # and S is the masked Fisher projected on the basis (sampled labels too)
        unmasked = refit_scaling(
            one, model, orc.TASK, targets, batches, labels="sampled", samples=2,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        assert not all(torch.allclose(one.scaling[t], unmasked.scaling[t]) for t in one.layers)


def test_masked_scaling_of_a_widening_linear():
    # o > i': the masked one-position path for a layer with more outputs than inputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(0)
    masks = {t: torch.rand(tg.shape, generator=gen) > 0.3 for t, tg in targets.items()}
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact", masks=masks)
    pgrads, _ = orc.per_example(model, x, y, "exact")
    for name in orc.layer_names(model):
        t, ly = f"{name}.weight", ekfac.layers[f"{name}.weight"]
        blocks = orc.block_grads(model, {**pgrads, t: pgrads[t] * masks[t]}, name)
        n, terms, grp = blocks.shape[:3]
        v = blocks.reshape(n * terms, grp, -1).transpose(0, 1)
        q = orc.kron_basis(ekfac.basis.u_g[t], ekfac.basis.u_a[t])
        want = ((v @ q).pow(2).sum(1) / n).reshape(grp, ly.rows, ly.cols)
        torch.testing.assert_close(ekfac.scaling[t], want, **CLOSE)


def test_project_skips_zero_rows_exactly():
    """Padded (all-zero) rows take no GEMM yet every row equals rows @ u (float64)."""
    from prunekit.criteria.ekfac import _project

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 1, 5, 1024, generator=gen, dtype=torch.float64)  # wide: skipping on
    rows[0, 0, 3:] = 0.0  # padding at the end of example 0
    rows[2, 0, 1] = 0.0  # and a zero row inside example 2
    u = torch.linalg.qr(torch.randn(1, 1024, 1024, generator=gen, dtype=torch.float64))[0]
    got = _project(rows, u)
    assert got.shape == rows.shape
    torch.testing.assert_close(got, torch.einsum("nglc,gcd->ngld", rows, u))
    grouped = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    u2 = torch.linalg.qr(torch.randn(2, 4, 4, generator=gen, dtype=torch.float64))[0]
    torch.testing.assert_close(_project(grouped, u2), torch.einsum("nglc,gcd->ngld", grouped, u2))
