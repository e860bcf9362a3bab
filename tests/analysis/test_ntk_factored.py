"""The factored Linear path of the tangent kernel: its math, when it applies, what it leaves.

Equality with the dense float64 oracle on MLP, CNN and LSTM models (total, per layer, masks,
centring) is in test_ntk.py (the ``kernel_path`` fixture); here: the masked kernel against
an explicit Jacobian, the fallbacks to jacrev, float32 accuracy and the no-trace contract.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.analysis import ntk_alignment, ntk_record, tangent_kernel
from prunekit.analysis.ntk_factored import _masked_weight_kernel, factored_kernel
from prunekit.criteria.capture import capture

N, C = 7, 3
LOGGER = "prunekit.analysis.ntk"


def _explicit(a, g, mask):
    """K from the materialised Jacobian J[(c, i), (o, k)] = g[c, i, o] a[i, k], masked."""
    jac = (g[:, :, :, None] * a[None, :, None, :]).reshape(g.shape[0] * g.shape[1], -1)
    jac = jac[:, mask.reshape(-1)]
    return (jac @ jac.T).view(g.shape[0], g.shape[1], g.shape[0], g.shape[1])


@pytest.mark.parametrize("n, chunk", [(7, 1), (11, 3), (11, 4), (11, 11)])
def test_masked_weight_kernel_equals_explicit_jacobian(n, chunk):
    gen = torch.Generator().manual_seed(n + chunk)
    a = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(C, n, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 6, generator=gen) < 0.5
    got = _masked_weight_kernel(a, g, mask.double(), chunk)
    torch.testing.assert_close(got, _explicit(a, g, mask), atol=1e-12, rtol=1e-12)
    got = factored_kernel((a, g), mask, budget_bytes=1e9)
    torch.testing.assert_close(got, _explicit(a, g, mask), atol=1e-12, rtol=1e-12)
    full = torch.ones(5, 6, dtype=torch.bool)  # all kept: the unmasked formula
    torch.testing.assert_close(
        factored_kernel((a, g), full, 1e9), _explicit(a, g, full), atol=1e-12, rtol=1e-12
    )


class Shared(nn.Module):
    """One Linear applied twice: its factors from one call would miss the other."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Sequence(nn.Module):
    """Linear over (N, T, in): rows are not examples, so it stays on jacrev."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.view(x.shape[0], 2, 2).repeat(1, 1, 2))).mean(1))


class Scaled(nn.Linear):
    """Overrides forward: not nn.Linear's own, so not factored."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, C))
    model[2].weight = model[0].weight  # one parameter, two modules
    return model


def plain():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, C))


def scaled():
    return nn.Sequential(Scaled(4, 5), nn.Tanh(), nn.Linear(5, C))


@pytest.mark.parametrize(
    "make, factored",
    [
        (plain, ["0.bias", "0.weight", "2.bias", "2.weight"]),
        (Shared, ["head.bias", "head.weight"]),
        (Sequence, ["head.bias", "head.weight"]),
        (tied, ["0.bias", "2.bias", "4.bias", "4.weight"]),  # the tied weight is not
        (scaled, ["2.bias", "2.weight"]),
    ],
)
def test_factored_only_where_exact_and_equal_to_jacrev(make, factored, caplog):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(N, 4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(p.shape, generator=gen) < 0.6 for n, p in params.items()}
    slow = tangent_kernel(model, x, masks=masks)  # weights and biases, all masked
    with caplog.at_level("DEBUG", logger=LOGGER):
        fast = tangent_kernel(model, x, masks=masks, capture=capture)
    assert f"factored path for {factored}" in caplog.text
    assert list(fast) == list(slow)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-12, rtol=1e-10)


def test_float32_factored_close_to_float64():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, C)
    )
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 8, generator=gen), torch.randint(0, C, (40,), generator=gen)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()}
    ref = ntk_alignment(model.double(), x.double(), y, masks=masks)
    got = ntk_alignment(model.float(), x, y, masks=masks, capture=capture)
    assert got["alignment"] == pytest.approx(ref["alignment"], rel=1e-5)
    for name, value in ref["per_layer"].items():
        assert got["per_layer"][name] == pytest.approx(value, rel=1e-5, nan_ok=True)
    assert got["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-4)
    assert got["trace"] == pytest.approx(ref["trace"], rel=1e-5)


def test_factored_path_leaves_no_trace_even_without_requires_grad():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, C)
    )
    model.train()
    model[0].weight.requires_grad_(False)  # frozen layers must stay frozen
    model[4].bias.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    grad = model[4].weight.grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(N, 4), torch.randint(0, C, (N,))
    with torch.no_grad():  # a caller's no_grad must not disable the backward passes
        res = ntk_alignment(model, x, y, capture=capture)
    assert res["per_layer"]["0.weight"] > 0  # really computed through the frozen layer
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True, False]
    assert model[4].weight.grad is grad and torch.all(grad == 1.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def test_spectrum_false_skips_only_the_effective_rank():
    torch.manual_seed(4)
    model = plain().double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, C, (N,))
    full = ntk_alignment(model, x, y, capture=capture)
    quick = ntk_alignment(model, x, y, capture=capture, spectrum=False)
    assert quick["effective_rank"] is None and full["effective_rank"] > 1.0
    assert {k: v for k, v in quick.items() if k != "effective_rank"} == {
        k: v for k, v in full.items() if k != "effective_rank"
    }
    assert ntk_record(1, "prune", None, 0.5, quick)["effective_rank_train"] is None


def test_factored_path_unchanged_by_an_inplace_activation():
    """ReLU(inplace=True) after a Linear must not change the captured factors."""
    import copy

    from torch import nn

    from prunekit.analysis import ntk_alignment
    from prunekit.criteria.capture import capture

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    want = ntk_alignment(plain, x, y, capture=capture)
    got = ntk_alignment(inplace, x, y, capture=capture)
    assert got["alignment"] == pytest.approx(want["alignment"], rel=1e-9)
    for name, value in want["per_layer"].items():
        assert got["per_layer"][name] == pytest.approx(value, rel=1e-9)
