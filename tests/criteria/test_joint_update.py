"""The joint OBS update of a pruning step equals the dense float64 OBS solution."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from prunekit.criteria import fit_ekfac, joint_update, obs_update
from prunekit.prune.targets import find_targets

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles", Path(__file__).with_name("kfac_oracles.py")
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)


def _dense_h(ekfac, t, damping):
    s = ekfac.scaling[t]
    dense = orc.dense_from_scaling(ekfac.basis.u_g[t], s, ekfac.basis.u_a[t])
    return dense + damping * float(s.mean()) * torch.eye(dense.shape[-1], dtype=dense.dtype)


def _block_vec(ly, weight, bias):
    block = weight.reshape(ly.groups, ly.rows, -1)
    if ly.bias is not None:
        block = torch.cat([block, bias.reshape(ly.groups, ly.rows, 1)], -1)
    return block.reshape(ly.groups, -1)


@pytest.mark.parametrize(("arch", "layer"), [("mlp", "0"), ("cnn", "2")])
def test_joint_update_equals_dense_obs(arch, layer):
    model = {"mlp": orc.tiny_mlp, "cnn": orc.tiny_cnn}[arch]()
    x, y = orc.data(model, 6)
    targets = find_targets(model)
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    t = f"{layer}.weight"
    ly = ekfac.layers[t]
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    gen = torch.Generator().manual_seed(3)
    masks[t] = torch.rand(params[t].shape, generator=gen) > 0.4  # ~40% of the layer at once
    deltas = joint_update(ekfac, params, masks, damping=0.05, tol=1e-12)

    # dense: delta = -H^-1 E_Q (E_Q^T H^-1 E_Q)^-1 theta_Q per group (bias never removed)
    h_inv = torch.linalg.inv(_dense_h(ekfac, t, 0.05))
    theta = _block_vec(ly, params[t], params.get(ly.bias))
    kept = _block_vec(ly, masks[t].double(), torch.ones(ly.shape[0], dtype=torch.float64))
    want = torch.zeros_like(theta)
    for g in range(ly.groups):
        q = torch.nonzero(kept[g] == 0).flatten()
        sub = h_inv[g][q][:, q]
        want[g] = -h_inv[g][:, q] @ torch.linalg.solve(sub, theta[g, q])
    got = _block_vec(ly, deltas[t], deltas.get(ly.bias))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not (params[t] + deltas[t])[~masks[t]].any()  # removed entries exactly zero


def test_joint_beats_summed_on_the_quadratic_model():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 20)
    targets = find_targets(model)
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    t, ly = "0.weight", ekfac.layers["0.weight"]
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    masks[t] = params[t].abs() > params[t].abs().quantile(0.5)  # half of the layer at once
    h = _dense_h(ekfac, t, 1e-2)[0]

    def increase(d):
        v = _block_vec(ly, d[t], d[ly.bias])[0]
        return float(0.5 * v @ h @ v)

    joint = increase(joint_update(ekfac, params, masks, damping=1e-2, tol=1e-10))
    summed = increase(obs_update(ekfac, params, masks, damping=1e-2))
    assert joint < summed  # the joint solution is the minimiser, the summed one is not


def test_per_layer_damping_dict_is_used():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 8)
    targets = find_targets(model)
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    masks = {n: params[n].abs() > params[n].abs().median() for n in targets}
    small = joint_update(ekfac, params, masks, damping={n: 1e-4 for n in targets})
    big = joint_update(ekfac, params, masks, damping={n: 10.0 for n in targets})
    same = joint_update(ekfac, params, masks, damping=1e-4)
    assert not torch.allclose(small["0.weight"], big["0.weight"])
    torch.testing.assert_close(small["0.weight"], same["0.weight"])


@pytest.mark.parametrize(("arch", "layer"), [("mlp", "0"), ("cnn", "2")])
def test_rows_update_equals_dense_reconstruction_per_row(arch, layer):
    """Rows form, every row exact (exact_max above the width): per output row, the minimiser
    of (w - w')^T (A + lam I) (w - w') with the removed entries at zero, A = KFAC's input
    factor, solved densely in float64 per row; EKFAC's A (from its eigenbasis) gives the same."""
    from prunekit.criteria import fit_kfac, rows_update

    model = {"mlp": orc.tiny_mlp, "cnn": orc.tiny_cnn}[arch]()
    x, y = orc.data(model, 6)
    targets = find_targets(model)
    kfac = fit_kfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    t = f"{layer}.weight"
    ly = kfac.layers[t]
    masks = {n: torch.ones(tg.shape, dtype=torch.bool) for n, tg in targets.items()}
    masks[t] = torch.rand(params[t].shape, generator=torch.Generator().manual_seed(4)) > 0.4
    deltas = rows_update(kfac, params, masks, damping=0.05, exact_max=10**6)
    theta = _block_vec(ly, params[t], params.get(ly.bias)).reshape(ly.groups, ly.rows, -1)
    kept = _block_vec(ly, masks[t].double(), torch.ones(ly.shape[0], dtype=torch.float64))
    kept = kept.reshape(ly.groups, ly.rows, -1).bool()
    want = torch.zeros_like(theta)
    for g in range(ly.groups):
        a = kfac.A[t][g].double()
        h = a + 0.05 * float(a.diagonal().mean()) * torch.eye(a.shape[0], dtype=a.dtype)
        for r in range(ly.rows):
            q = torch.nonzero(~kept[g, r]).flatten()
            if len(q):
                hinv = torch.linalg.inv(h)
                sub = hinv[q][:, q]
                want[g, r] = -hinv[:, q] @ torch.linalg.solve(sub, theta[g, r, q])
    got = _block_vec(ly, deltas[t], deltas.get(ly.bias)).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not (params[t] + deltas[t])[~masks[t]].any()
    ekfac = fit_ekfac(model, orc.TASK, targets, [(x, y)], labels="exact")
    from_ekfac = rows_update(ekfac, params, masks, damping=0.05, exact_max=10**6)
    torch.testing.assert_close(from_ekfac[t], deltas[t], rtol=1e-6, atol=1e-9)
