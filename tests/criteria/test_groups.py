"""Group (unit) scores against float64 brute force: norms, Taylor terms from torch.func,
the group quadratic against dense Fisher blocks and kron(G, A) / Q diag(S) Q^T, and the
structured OBS column update against the constrained minimum of the dense quadratic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from prunekit.criteria import fit_kfac
from prunekit.criteria.ekfac import fit_ekfac
from prunekit.criteria.fisher import mean_gradient
from prunekit.criteria.groups import (
    Factored,
    factored_layers,
    group_scores,
    obs_column_update,
    quadratic_terms,
)
from prunekit.errors import SettingError
from prunekit.prune.groups import Member, UnitGroup
from prunekit.prune.targets import find_targets

_spec = importlib.util.spec_from_file_location(
    "kfac_oracles", Path(__file__).with_name("kfac_oracles.py")
)
orc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orc)


def mlp_groups() -> list[UnitGroup]:
    """Hidden neurons of orc.tiny_mlp (6-5-4-3; layer 2 has no bias)."""
    return [
        UnitGroup("0", "neuron", 5, (Member("0.weight", 0), Member("0.bias", 0),
                                     Member("2.weight", 1, "in"))),
        UnitGroup("2", "neuron", 4, (Member("2.weight", 0), Member("4.weight", 1, "in"))),
    ]  # fmt: skip


def tiny_convnet(seed: int = 0) -> nn.Module:
    """2x5x5 -> conv3(pad 1) 3ch -> conv2 2ch (4x4) -> flatten -> linear(3), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Tanh(),
        nn.Flatten(), nn.Linear(32, 3),
    ).double()  # fmt: skip


def conv_groups() -> list[UnitGroup]:
    """Channels of tiny_convnet: conv0 read by conv2's input channels, conv2's channels by
    the Linear's 16 flattened columns each."""
    return [
        UnitGroup("0", "channel", 3, (Member("0.weight", 0), Member("0.bias", 0),
                                      Member("2.weight", 1, "in"))),
        UnitGroup("2", "channel", 2, (Member("2.weight", 0), Member("2.bias", 0),
                                      Member("5.weight", 1, "in", width=16))),
    ]  # fmt: skip


def conv_data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def entries(group: UnitGroup, tensors: dict, unit: int) -> list[torch.Tensor]:
    """Brute force: the unit's entries per member, by explicit index_select."""
    return [tensors[m.param].index_select(m.dim, m.index(unit)).reshape(-1) for m in group.members]


def unit_vector(model, group: UnitGroup, unit: int, layer: str) -> torch.Tensor:
    """The unit's entries of layer ``layer`` as a vec of the block [W | b] (zeros elsewhere)."""
    mod = model.get_submodule(layer)
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    keep = torch.zeros(mod.weight.shape, dtype=torch.bool)
    keep_b = torch.zeros(w.shape[0], dtype=torch.bool)
    for m in group.members:
        if m.param == f"{layer}.weight":
            keep.index_fill_(m.dim, m.index(unit), True)
        if m.param == f"{layer}.bias":
            keep_b[m.index(unit)] = True
    block = w * keep.reshape(w.shape[0], -1)
    if mod.bias is not None:
        block = torch.cat([block, (mod.bias.detach() * keep_b)[:, None]], 1)
    return block.reshape(-1)


def test_magnitude_is_the_l2_norm_of_the_unit_entries():
    model = orc.tiny_mlp()
    params = dict(model.named_parameters())
    scores = group_scores("magnitude", mlp_groups(), params)
    for g in mlp_groups():
        want = torch.stack([torch.linalg.norm(torch.cat(entries(g, params, j)))
                            for j in range(g.size)])  # fmt: skip
        torch.testing.assert_close(scores[g.name], want.detach())
    normed = group_scores("magnitude", mlp_groups(), params, normalize=True)
    torch.testing.assert_close(normed["0"].mean(), torch.tensor(1.0, dtype=torch.float64))


def test_taylor_is_the_squared_group_sum_of_grad_times_theta():
    model = orc.tiny_mlp()
    x, y = orc.data(model, 7)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        out = functional_call(model, p, (x,))
        return nn.functional.cross_entropy(out, y)

    g_func = grad(loss)(params)
    groups = mlp_groups()
    g_run = mean_gradient(model, orc.TASK, list(params), [(x, y)])
    scores = group_scores("lm", groups, params, grads=g_run)
    for g in groups:
        for j in range(g.size):
            want = sum((a * b).sum() for a, b in zip(entries(g, g_func, j), entries(g, params, j),
                                                     strict=True)) ** 2  # fmt: skip
            torch.testing.assert_close(scores[g.name][j], want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_one_example_group_quadratic_equals_dense_fisher_blocks(estimator):
    # On one example a Linear layer's Fisher block is exactly kron(G, A) (and EKFAC equals
    # KFAC there), so the factored group quadratic must equal theta_g^T F theta_g with the
    # dense per-example Fisher of torch.func, summed over the layers the unit touches.
    model = orc.tiny_mlp()
    x, y = orc.data(model, 1)
    fit = fit_kfac if estimator == "kfac" else fit_ekfac
    curv = fit(model, orc.TASK, find_targets(model), [(x, y)], labels="exact")
    fac = factored_layers(curv)
    assert set(fac) == {"0.weight", "2.weight", "4.weight"}
    assert all(f.ekfac == (estimator == "ekfac") for f in fac.values())
    params = dict(model.named_parameters())
    quad = quadratic_terms(mlp_groups(), params, fac, {})
    obd = group_scores("obd", mlp_groups(), params, factored=fac, diag={})
    for g in mlp_groups():
        for j in range(g.size):
            want = 0.0
            for layer in {m.param.split(".")[0] for m in g.members}:
                dense = orc.dense_fisher(model, x, y, "exact", layer)[0]
                v = unit_vector(model, g, j, layer)
                want = want + v @ dense @ v
            torch.testing.assert_close(quad[g.name][j], want, rtol=1e-7, atol=1e-14)
            torch.testing.assert_close(obd[g.name][j], 0.5 * want, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_conv_group_quadratic_equals_the_dense_kronecker_form(estimator):
    # Many examples and conv positions: compare the factored form with the dense matrix the
    # estimator stands for, kron(G, A) or Q diag(vec S) Q^T with Q = kron(U_G, U_A), on
    # channel groups whose consumers are a conv's input channels (k columns each) and a
    # Linear's flattened columns (16 per channel).
    model = tiny_convnet()
    x, y = conv_data(6)
    fit = fit_kfac if estimator == "kfac" else fit_ekfac
    curv = fit(model, orc.TASK, find_targets(model), [(x, y)], labels="exact")
    fac = factored_layers(curv)
    params = dict(model.named_parameters())
    quad = quadratic_terms(conv_groups(), params, fac, {})
    for g in conv_groups():
        for j in range(g.size):
            want = 0.0
            for layer in {m.param.split(".")[0] for m in g.members}:
                f = fac[f"{layer}.weight"]
                if f.ekfac:
                    q = torch.kron(f.u_g, f.u_a)
                    dense = q @ torch.diag(f.s.reshape(-1)) @ q.T
                else:
                    dense = torch.kron(f.G, f.A)
                v = unit_vector(model, g, j, layer)
                want = want + v @ dense @ v
            torch.testing.assert_close(quad[g.name][j], want, rtol=1e-8, atol=1e-14)


def test_diagonal_members_and_the_locality_penalty():
    # A member outside any factored layer (here every member: diag only) counts as
    # 0.5 sum d theta^2; lam adds 0.5 lam ||theta_g||^2; qm adds the signed first order.
    model = orc.tiny_mlp()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    diag = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    obd = group_scores("obd", mlp_groups(), params, factored={}, diag=diag, lam=0.3)
    qm = group_scores("qm", mlp_groups(), params, grads=grads, factored={}, diag=diag)
    for g in mlp_groups():
        for j in range(g.size):
            th, d, gr = entries(g, params, j), entries(g, diag, j), entries(g, grads, j)
            quad = sum((a * b.pow(2)).sum() for a, b in zip(d, th, strict=True))
            sq = sum(b.pow(2).sum() for b in th)
            lin = sum((a * b).sum() for a, b in zip(gr, th, strict=True))
            torch.testing.assert_close(obd[g.name][j], (0.5 * quad + 0.15 * sq).detach())
            torch.testing.assert_close(qm[g.name][j], (0.5 * quad - lin).abs().detach())


def _random_factored(o: int, i: int, seed: int) -> tuple[Factored, dict]:
    gen = torch.Generator().manual_seed(seed)

    def spd(n):
        m = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
        return m @ m.T / n

    f = Factored("w", "b", (o, i), spd(o), spd(i + 1))
    params = {"w": torch.randn(o, i, generator=gen, dtype=torch.float64),
              "b": torch.randn(o, generator=gen, dtype=torch.float64)}  # fmt: skip
    return f, params


def test_obs_column_update_is_the_constrained_minimum_of_the_dense_quadratic():
    # Removing columns R of [W | b] under F = kron(G, A): the best update of the other
    # entries minimises 0.5 d^T F d with d_R = -theta_R; solve it densely and compare the
    # update and the OBS saliency (damping 0).
    f, params = _random_factored(3, 5, 0)
    removed = torch.tensor([1, 3])
    delta = obs_column_update(f, params, removed, damping=0.0)
    block = torch.cat([params["w"], params["b"][:, None]], 1)
    dense = torch.kron(f.G, f.A)
    cols = 6
    fixed = torch.tensor([r * cols + c for r in range(3) for c in removed.tolist()])
    free = torch.tensor([k for k in range(18) if k not in set(fixed.tolist())])
    d_fixed = -block.reshape(-1)[fixed]
    d_free = -torch.linalg.solve(dense[free][:, free], dense[free][:, fixed] @ d_fixed)
    want = torch.zeros(18, dtype=torch.float64)
    want[fixed], want[free] = d_fixed, d_free
    got = torch.cat([delta["w"], delta["b"][:, None]], 1).reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    group = UnitGroup("u", "neuron", 5, (Member("w", 1, "in"),))
    scores = group_scores("obs", [group], params, factored={"w": f}, diag={}, obs_damping=0.0)
    for j in range(5):
        fx = torch.tensor([r * cols + j for r in range(3)])
        fr = torch.tensor([k for k in range(18) if k not in set(fx.tolist())])
        th = block.reshape(-1)[fx]
        d = -torch.linalg.solve(dense[fr][:, fr], dense[fr][:, fx] @ -th)
        full = torch.zeros(18, dtype=torch.float64)
        full[fx], full[fr] = -th, d
        torch.testing.assert_close(scores["u"][j], 0.5 * full @ dense @ full, rtol=1e-8, atol=0)
    plain = group_scores("obd", [group], params, factored={"w": f}, diag={})
    assert bool((scores["u"] <= plain["u"] + 1e-12).all())  # compensation never hurts


def test_bad_criterion_and_missing_inputs_are_refused():
    params = dict(orc.tiny_mlp().named_parameters())
    with pytest.raises(SettingError, match="group criterion"):
        group_scores("wanda", mlp_groups(), params)
    with pytest.raises(SettingError, match="gradients"):
        group_scores("lm", mlp_groups(), params)
    with pytest.raises(SettingError, match="curvature"):
        group_scores("obd", mlp_groups(), params)
