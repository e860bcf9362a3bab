"""OBS saliency and compensation against dense float64 formulas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from prunekit.criteria import OBS, fit_diag, fit_ekfac, obs_update
from prunekit.prune.targets import find_targets

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles", Path(__file__).with_name("kfac_oracles.py")
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)

MODELS = {"mlp": orc.tiny_mlp, "cnn": orc.tiny_cnn}


def _dense_h(ekfac, t, damping, absolute=0.0):
    """H = Q diag(S) Q^T + lam I per group, lam = damping * mean(S) + absolute."""
    s = ekfac.scaling[t]
    dense = orc.dense_from_scaling(ekfac.basis.u_g[t], s, ekfac.basis.u_a[t])
    lam = damping * float(s.mean()) + absolute
    return dense + lam * torch.eye(dense.shape[-1], dtype=dense.dtype)


def _block_vec(ly, weight, bias):
    """[W_g | b_g] per group, row-major vec: (groups, o * i')."""
    block = weight.reshape(ly.groups, ly.rows, -1)
    if ly.bias is not None:
        block = torch.cat([block, bias.reshape(ly.groups, ly.rows, 1)], -1)
    return block.reshape(ly.groups, -1)


def test_saliency_equals_dense_formula():
    model = orc.tiny_cnn()
    x, y = orc.data(model, 6)
    crit = OBS(damping=0.01, lam=0.002)
    result = crit.evaluate(model, orc.TASK, find_targets(model), [(x, y)])
    ekfac = result.curvature
    assert set(result.estimators.values()) == {"ekfac"}
    for t, ly in ekfac.layers.items():
        h_inv = torch.linalg.inv(_dense_h(ekfac, t, 0.01, 0.002))
        diag = torch.diagonal(h_inv, dim1=1, dim2=2).reshape(ly.groups, ly.rows, ly.cols)
        diag = diag[..., : ly.cols - (ly.bias is not None)].reshape(ly.shape)
        theta = dict(model.named_parameters())[t].detach()
        want = theta.pow(2) / (2 * diag)
        torch.testing.assert_close(result.scores[t], want.float(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(("arch", "layer", "flat"), [("mlp", "0", 7), ("cnn", "2", 41)])
def test_single_weight_update_equals_dense_obs(arch, layer, flat):
    # F is exactly Q diag(S) Q^T (the EKFAC matrix), so the dense OBS step
    # delta = -theta_q H^-1 e_q / [H^-1]_qq is what obs_update must return.
    model = MODELS[arch]()
    x, y = orc.data(model, 5)
    targets = find_targets(model)
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    t = f"{layer}.weight"
    ly = ekfac.layers[t]
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    masks[t].view(-1)[flat] = False
    deltas = obs_update(ekfac, params, masks, damping=0.05)

    h_inv = torch.linalg.inv(_dense_h(ekfac, t, 0.05))
    w_cols = ly.cols - (ly.bias is not None)
    grp, rem = divmod(flat, ly.rows * w_cols)
    q = (rem // w_cols) * ly.cols + rem % w_cols  # index in the group's row-major block
    theta_q = params[t].reshape(-1)[flat]
    step = torch.zeros(ly.groups, h_inv.shape[-1], dtype=h_inv.dtype)
    step[grp] = -theta_q * h_inv[grp, :, q] / h_inv[grp, q, q]
    got = _block_vec(ly, deltas[t], deltas.get(ly.bias))
    torch.testing.assert_close(got, step, rtol=1e-8, atol=1e-12)
    assert float(params[t].reshape(-1)[flat] + deltas[t].reshape(-1)[flat]) == 0.0
    for n, d in deltas.items():  # other layers are untouched
        if n not in (t, ly.bias):
            assert not d.any(), n


def test_update_reduces_the_quadratic_loss_increase():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 20)
    targets = find_targets(model)
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    t, ly = "0.weight", ekfac.layers["0.weight"]
    theta = params[t]
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    masks[t] = theta.abs() > theta.abs().quantile(0.2)  # remove 20% of the layer at once
    deltas = obs_update(ekfac, params, masks, damping=1e-3)
    zero_only = {t: torch.where(masks[t], 0.0, -theta), ly.bias: torch.zeros(ly.shape[0])}
    h = _dense_h(ekfac, t, 1e-3)[0]

    def increase(d):
        v = _block_vec(ly, d[t], d[ly.bias])[0]
        return float(0.5 * v @ h @ v)

    assert increase(deltas) < 0.9 * increase(zero_only), (increase(deltas), increase(zero_only))
    new = theta + deltas[t]
    assert bool((new[~masks[t]] == 0).all()) and bool((new[masks[t]] != theta[masks[t]]).any())


def test_previously_pruned_stay_zero_and_diag_does_not_compensate():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 8)
    targets = find_targets(model)
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0  # pruned at an earlier step
    params = {n: p.detach() for n, p in model.named_parameters()}
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    masks["0.weight"][0, :4] = False  # one new weight removed
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact", masks=masks)
    deltas = obs_update(ekfac, params, masks)
    assert not (params["0.weight"] + deltas["0.weight"])[0, :4].any()
    assert deltas["0.weight"][1:].abs().sum() > 0  # survivors compensate
    diag = fit_diag(model, orc.TASK, targets, [(x, y)])
    d_deltas = obs_update(diag, params, masks)
    assert not d_deltas["0.weight"][masks["0.weight"]].any()
    assert torch.equal(d_deltas["0.weight"][0, 3], -params["0.weight"][0, 3])


def test_large_lambda_ranks_like_magnitude():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 6)
    scores = OBS(lam=1e6).score(model, orc.TASK, find_targets(model), [(x, y)])
    for n, s in scores.items():
        theta = dict(model.named_parameters())[n].detach().abs().reshape(-1)
        assert torch.equal(torch.argsort(s.reshape(-1)), torch.argsort(theta)), n
