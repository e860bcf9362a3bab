"""NTK alignment against a dense-Jacobian float64 oracle (torch.func.jacrev of everything).

Ordering used everywhere: Jacobian/kernel rows are (c, i) output-major, row = c * n + i,
so centring is (I_C kron H_n) K (I_C kron H_n). Tests taking ``kernel_path`` run twice: on
the per-example jacrev path (capture=None) and with the hook factory injected, where Linear
layers use the factored kernel and the rest (conv, LSTM) stays on jacrev.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from prunekit.analysis import ntk_alignment, tangent_kernel
from prunekit.analysis.ntk import _plan_blocks, default_kernel_params, effective_rank
from prunekit.criteria.capture import capture
from prunekit.errors import SettingError

N, C = 6, 4


@pytest.fixture(params=["jacrev", "factored"])
def kernel_path(request):
    """The ``capture=`` argument: None (jacrev everywhere) or the hook factory (factored)."""
    return None if request.param == "jacrev" else capture


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, C)).to(dtype)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8, C),
    ).double()


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def data(shape, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, *shape), generator=g, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y


def dense_oracle(model, x, names, masks=None, centered=True):
    """Per-name kernels from the full Jacobian of all parameters (batched forward, eval)."""
    model = copy.deepcopy(model).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def flat_outputs(p):
        return functional_call(model, p, (x,)).reshape(N, -1).T.reshape(-1)  # (c, i) order

    jac = jacrev(flat_outputs)(params)
    kernels = {}
    for name in names:
        j = jac[name].reshape(C * N, -1)
        if masks is not None:
            j = j[:, masks[name].reshape(-1)]
        if centered:
            j3 = j.reshape(C, N, -1)
            j = (j3 - j3.mean(dim=1, keepdim=True)).reshape(C * N, -1)
        kernels[name] = j @ j.T
    return kernels


def oracle_alignment(kernel, labels, centered=True):
    y = nn.functional.one_hot(labels, C).double() if labels.dim() == 1 else labels.double()
    if centered:
        y = y - y.mean(0)
    y = y.T.reshape(-1)
    return float(y @ kernel @ y / (torch.linalg.matrix_norm(kernel) * (y @ y)))


def check_against_oracle(model, x, labels, tol=1e-10, capture=None, **kw):
    names = default_kernel_params(model)
    res = ntk_alignment(model, x, labels, capture=capture, **kw)
    centered = kw.get("centered", True)
    oracle = dense_oracle(model, x, names, kw.get("masks"), centered)
    total = sum(oracle.values())
    assert res["alignment"] == pytest.approx(oracle_alignment(total, labels, centered), abs=tol)
    assert set(res["per_layer"]) == set(names)
    for name in names:
        assert res["per_layer"][name] == pytest.approx(
            oracle_alignment(oracle[name], labels, centered), abs=tol
        )
    eig = torch.linalg.eigvalsh(total).clamp_min(0)
    p = eig[eig > 0] / eig.sum()
    assert res["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-8)
    assert res["trace"] == pytest.approx(float(total.trace()) / N, rel=1e-10)
    assert (res["n"], res["outputs"]) == (N, C)
    kernels = tangent_kernel(model, x, masks=kw.get("masks"), centered=centered, capture=capture)
    for name in names:
        torch.testing.assert_close(kernels[name], oracle[name], atol=1e-10, rtol=1e-9)
    return res


def test_mlp_matches_dense_jacobian(kernel_path):
    x, y = data((5,))
    res = check_against_oracle(mlp(), x, y, capture=kernel_path)
    assert 0 < res["alignment"] < 1


def test_cnn_matches_dense_jacobian_in_eval_mode(kernel_path):
    model = cnn().train()  # BN batch statistics would break equality if eval were not forced
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x, y = data((1, 6, 6))
    check_against_oracle(model, x, y, capture=kernel_path)


def test_uncentered_matches_dense_jacobian(kernel_path):
    x, y = data((5,))
    check_against_oracle(mlp(), x, y, centered=False, capture=kernel_path)


def test_lstm_matches_dense_jacobian(kernel_path):
    torch.manual_seed(3)
    model = TinyLSTM().double()
    x, y = data((5, 3))
    res = check_against_oracle(model, x, y, tol=1e-9, capture=kernel_path)
    assert set(res["per_layer"]) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}


def test_float32_model_close_to_float64_oracle():
    x, y = data((5,))
    res32 = ntk_alignment(mlp(torch.float32), x.float(), y)
    res64 = ntk_alignment(mlp(torch.float64), x, y)
    assert res32["alignment"] == pytest.approx(res64["alignment"], rel=1e-4)
    assert res32["alignment"] != res64["alignment"]  # really computed in float32


@pytest.mark.parametrize("seed", range(4))
def test_alignment_in_unit_interval(seed):
    x, y = data((5,), seed=seed)
    res = ntk_alignment(mlp(seed=seed), x * (1 + 3 * seed), y)
    values = [res["alignment"], *res["per_layer"].values()]
    assert all(0.0 <= v <= 1.0 for v in values), values


def test_alignment_reaches_one_for_rank_one_kernel():
    # f(x) = w . x with x_i = a_i u: K = |u|^2 a a^T, so y = a is perfectly aligned.
    model = nn.Linear(3, 1, bias=False).double()
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    x = a[:, None] * torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    res = ntk_alignment(model, x, a[:, None], targets_kind="regression", centered=False)
    assert res["alignment"] == pytest.approx(1.0, abs=1e-12)
    assert res["effective_rank"] == pytest.approx(1.0, abs=1e-9)


def test_invariant_to_label_scaling_and_shift():
    x, _ = data((5,))
    targets = torch.randn(N, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = ntk_alignment(mlp(), x, targets, targets_kind="regression")
    scaled = ntk_alignment(mlp(), x, 7.3 * targets + 2.0, targets_kind="regression")
    assert scaled["alignment"] == pytest.approx(base["alignment"], rel=1e-12)
    for name, value in base["per_layer"].items():
        assert scaled["per_layer"][name] == pytest.approx(value, rel=1e-12)
    other = ntk_alignment(mlp(), x, targets.flip(0), targets_kind="regression")
    assert other["alignment"] != pytest.approx(base["alignment"], rel=1e-6)


@pytest.mark.parametrize("keep_fraction", [0.3, 0.8])  # gather path and zero-in-place path
def test_masked_columns_removed_exactly(keep_fraction, kernel_path):
    model, (x, y) = mlp(), data((5,))
    g = torch.Generator().manual_seed(7)
    names = default_kernel_params(model)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) < keep_fraction for n in names}
    res = check_against_oracle(model, x, y, masks=masks, capture=kernel_path)
    dense = ntk_alignment(model, x, y, capture=kernel_path)
    assert res["alignment"] != pytest.approx(dense["alignment"], rel=1e-6)


def test_mask_false_excludes_even_nonzero_weights_and_zero_weights_without_mask_count(
    kernel_path,
):
    model, (x, _) = mlp(), data((5,))
    name = "0.weight"
    mask = torch.ones(7, 5, dtype=torch.bool)
    mask[:, 2] = False
    kw = {"params": [name], "capture": kernel_path}
    masked = tangent_kernel(model, x, masks={name: mask}, **kw)[name]
    oracle = dense_oracle(model, x, [name], {name: mask})[name]
    torch.testing.assert_close(masked, oracle, atol=1e-10, rtol=1e-9)
    with torch.no_grad():
        model[0].weight[:, 2] = 0.0
    zeroed = tangent_kernel(model, x, **kw)[name]
    zeroed_masked = tangent_kernel(model, x, masks={name: mask}, **kw)[name]
    assert not torch.allclose(zeroed, zeroed_masked)  # hard zeros still have gradients


def test_centring_equals_kron_projection(kernel_path):
    model, (x, _) = cnn(), data((1, 6, 6))
    raw = tangent_kernel(model, x, centered=False, capture=kernel_path)
    centred = tangent_kernel(model, x, centered=True, capture=kernel_path)
    h = torch.eye(N, dtype=torch.float64) - torch.full((N, N), 1.0 / N, dtype=torch.float64)
    proj = torch.kron(torch.eye(C, dtype=torch.float64), h)  # (c, i) order: I_C outer
    for name, kernel in raw.items():
        torch.testing.assert_close(centred[name], proj @ kernel @ proj, atol=1e-10, rtol=1e-9)
        assert not torch.allclose(centred[name], kernel)


def _budget_mb(avail_bytes):
    """A budget leaving ``avail_bytes`` for Jacobian rows once the two kernels are counted."""
    return (2 * (C * N) ** 2 * 8 + avail_bytes) / 2**20


@pytest.mark.parametrize(
    "make, shape, avail",
    [
        (mlp, (5,), 2800),  # 2-3 rows per block < C: splits outputs too
        (cnn, (1, 6, 6), 10_000),  # splits examples only
    ],
)
def test_chunked_path_equals_direct_path(make, shape, avail, caplog):
    model, (x, y) = make(), data(shape)
    direct = tangent_kernel(model, x)
    with caplog.at_level("DEBUG", logger="prunekit.analysis.ntk"):
        chunked = tangent_kernel(model, x, memory_budget_mb=_budget_mb(avail))
    assert "row blocks" in caplog.text  # the chunked path really ran
    for name in direct:
        torch.testing.assert_close(chunked[name], direct[name], atol=1e-12, rtol=1e-10)
    a = ntk_alignment(model, x, y)
    b = ntk_alignment(model, x, y, memory_budget_mb=_budget_mb(avail))
    assert b["alignment"] == pytest.approx(a["alignment"], rel=1e-10)


def test_block_plan_covers_every_row_once_within_budget():
    for n, c, row, budget in [(7, 3, 10.0, 1e9), (7, 3, 10.0, 100.0), (7, 3, 10.0, 45.0)]:
        blocks = _plan_blocks(n, c, row, budget)
        cells = [(i, o) for e0, e1, c0, c1 in blocks for i in range(e0, e1) for o in range(c0, c1)]
        assert sorted(cells) == [(i, o) for i in range(n) for o in range(c)]
        if len(blocks) > 1:
            assert all(2 * (e1 - e0) * (c1 - c0) * row <= budget for e0, e1, c0, c1 in blocks)
    assert len(_plan_blocks(7, 3, 10.0, 39.0)) == 21  # two rows held at once: 1 row per block
    assert len(_plan_blocks(7, 3, 10.0, 45.0)) == 14  # 2 rows per block: outputs split 2 + 1


def test_leaves_no_trace(kernel_path):
    model, (x, y) = cnn(), data((1, 6, 6))
    model.train()
    model[1].eval()  # mixed flags must come back per module, not as one model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    grad_before = model[0].weight.grad
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ntk_alignment(model, x, y, capture=kernel_path)
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) and state[k].dtype == after[k].dtype for k in state)
    assert model[0].weight.grad is grad_before and torch.all(grad_before == 3.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert all(p.requires_grad for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def test_params_select_the_kernel_and_sum_to_total(kernel_path):
    model, (x, y) = mlp(), data((5,))
    names = ["0.weight", "0.bias", "2.weight"]
    kernels = tangent_kernel(model, x, params=names, capture=kernel_path)
    oracle = dense_oracle(model, x, names)
    assert list(kernels) == names
    for name in names:
        torch.testing.assert_close(kernels[name], oracle[name], atol=1e-10, rtol=1e-9)
    res = ntk_alignment(model, x, y, params=names, capture=kernel_path)
    assert res["alignment"] == pytest.approx(oracle_alignment(sum(oracle.values()), y), abs=1e-10)
    assert default_kernel_params(cnn()) == ["0.weight", "3.weight", "7.weight"]


def test_effective_rank_definition():
    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.diag(torch.tensor([5.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"params": ["nope.weight"]}, "nope.weight"),
        ({"targets_kind": "ranking"}, "ranking"),
        ({"num_classes": 9}, "num_classes=9"),
        ({"memory_budget_mb": 0}, "memory_budget_mb"),
        ({"memory_budget_mb": 1e-6}, "too small"),
        ({"masks": {"0.weight": torch.ones(3, 3, dtype=torch.bool)}}, "shape"),
    ],
)
def test_bad_settings_raise_setting_error(kwargs, match):
    x, y = data((5,))
    with pytest.raises(SettingError, match=match):
        ntk_alignment(mlp(), x, y, **kwargs)
