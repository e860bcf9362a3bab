"""Taylor criteria: hand-computed scores, formulas vs float64 oracles, no trace left."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from prunekit.criteria import CRITERIA, ESTIMATORS, make_criterion, taylor_score
from prunekit.errors import SettingError
from prunekit.prune.masks import next_masks
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

CLS = ClassificationTask()

THETA = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0])
G = torch.tensor([0.5, 0.25, -1.0, 3.0, 2.0])
D = torch.tensor([2.0, 0.5, 4.0, 1.0, 0.5])


# score = |-g*theta + 0.5*d*theta^2| + 0.5*lam*theta^2, computed by hand for each entry
HAND = {
    # magnitude: g = 0, d = 1 -> 0.5*theta^2
    "magnitude": [0.5, 2.0, 0.125, 0.0, 0.5],
    # lm: d = 0 -> |g*theta|
    "lm": [0.5, 0.5, 0.5, 0.0, 2.0],
    # qm: |-0.5+1| , |0.5+1|, |0.5+0.5|, 0, |-2+0.25|
    "qm": [0.5, 1.5, 1.0, 0.0, 1.75],
    # obd: 0.5*d*theta^2
    "obd": [1.0, 1.0, 0.5, 0.0, 0.25],
}
LAM_TERM = [0.05, 0.2, 0.0125, 0.0, 0.05]  # 0.5 * 0.1 * theta^2


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("name", sorted(HAND))
def test_taylor_score_hand_computed(name, lam):
    g = None if name in ("magnitude", "obd") else G
    d = {"magnitude": torch.ones(5), "lm": None}.get(name, D)
    got = taylor_score(THETA, g, d, lam)
    want = torch.tensor(HAND[name]) + (torch.tensor(LAM_TERM) if lam else 0.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_taylor_score_lambda_is_outside_the_absolute_value():
    # -g*theta + 0.5*d*theta^2 = -2 + 0.25 = -1.75; |.| = 1.75; + 0.5*lam*theta^2 = 0.5
    got = taylor_score(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), 1.0)
    assert float(got) == pytest.approx(2.25)


def test_taylor_score_large_lambda_ranks_like_magnitude():
    torch.manual_seed(0)
    theta, g, d = torch.randn(50), torch.randn(50), torch.rand(50)
    s = taylor_score(theta, g, d, 1e6)
    assert torch.equal(s.argsort(), theta.abs().argsort())


# ---------------------------------------------------------------- formulas vs oracles


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def tiny_data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def oracle_g_and_f(model, x, y):
    """Mean gradient (data labels) and exact true-Fisher diagonal, from torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def ce(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(ce), in_dims=(None, 0, 0))(params, x, y)
    g = {k: v.mean(0) for k, v in per.items()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    logits = functional_call(model, params, (x,))
    probs = torch.softmax(logits, -1)
    for c in range(3):
        per_c = vmap(grad(ce), in_dims=(None, 0, 0))(params, x, torch.full_like(y, c))
        for k in fisher:  # d(-log p_c) squared, weighted by p_c
            w = probs[:, c].reshape(-1, *([1] * (per_c[k].dim() - 1)))
            fisher[k] += (w * per_c[k].pow(2)).mean(0)
    return g, fisher


@pytest.mark.parametrize("lam", [0.0, 0.01])
@pytest.mark.parametrize("name", ["magnitude", "lm", "qm", "obd", "obs"])
def test_criterion_scores_equal_formula_on_oracle_g_and_fisher(name, lam):
    model = tiny_model()
    x, y = tiny_data()
    targets = find_targets(model)
    settings = {"lam": lam}
    if CRITERIA[name].uses_curvature:
        settings.update(fisher="diag", labels="exact")
    crit = make_criterion(name, **settings)
    got = crit.score(model, CLS, targets, [(x[:3], y[:3]), (x[3:], y[3:])])
    g, fisher = oracle_g_and_f(model, x, y)
    params = dict(model.named_parameters())
    oracle = {n: _formula(name, crit, lam, params[n].detach(), g[n], fisher[n]) for n in targets}
    for n in targets:
        assert got[n].dtype == torch.float32 and got[n].shape == params[n].shape
        torch.testing.assert_close(got[n].double(), oracle[n], rtol=1e-5, atol=1e-9, msg=n)
    # the ranking (what pruning uses) is the oracle's ranking
    full = {n: torch.ones_like(params[n], dtype=torch.bool) for n in targets}
    for s in (0.3, 0.6):
        assert _same(next_masks(got, full, s), next_masks(oracle, full, s))


def _formula(name, crit, lam, theta, g, f):
    """methods.md 1.3 (and OBS with a diagonal curvature: theta^2 / (2 [1/(f + damp)]))."""
    if name == "magnitude":
        return 0.5 * (1 + lam) * theta**2
    if name == "lm":
        return (g * theta).abs() + 0.5 * lam * theta**2
    if name == "qm":
        return (-g * theta + 0.5 * f * theta**2).abs() + 0.5 * lam * theta**2
    if name == "obd":
        return 0.5 * (f + lam) * theta**2
    return theta**2 * (f + crit.damping * float(f.mean()) + lam) / 2


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_qm_and_lm_differ_from_obd_and_magnitude_on_the_same_model():
    """Guards the oracle test: the four criteria give four different rankings here."""
    model = tiny_model()
    x, y = tiny_data()
    targets = find_targets(model)
    scores = {}
    for name in ("magnitude", "lm", "qm", "obd"):
        extra = {"fisher": "diag", "labels": "exact"} if CRITERIA[name].uses_curvature else {}
        scores[name] = make_criterion(name, **extra).score(model, CLS, targets, [(x, y)])
    flat = {k: torch.cat([v.flatten() for v in s.values()]).argsort() for k, s in scores.items()}
    names = sorted(flat)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(flat[a], flat[b]), (a, b)


# ---------------------------------------------------------------- no trace


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.fc1(x)))
        h = torch.tanh(self.conv(h.unsqueeze(1))).flatten(1)
        return self.fc2(h)


def _criterion_configs():
    for name in sorted(CRITERIA):
        if CRITERIA[name].uses_curvature:
            yield name, None  # the criterion's own default estimator
            for fisher in sorted(ESTIMATORS):
                yield name, fisher
        else:
            yield name, None


def _hook_dicts(module: nn.Module) -> dict[str, int]:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return {n: len(getattr(module, n, {})) for n in names}


def _global_hooks() -> dict[str, int]:
    from torch.nn.modules import module as mod

    names = [n for n in dir(mod) if n.startswith("_global_") and "hook" in n]
    return {n: len(getattr(mod, n) or ()) for n in names}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("name", "fisher"), list(_criterion_configs()))
def test_scoring_leaves_no_trace(name, fisher, training):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 6))
    model.train(training)
    model.conv.training = not training  # mixed flags: each module's own flag is restored
    model.fc1.bias.requires_grad_(False)  # frozen parameters stay frozen
    model.fc2.weight.requires_grad_(False)  # even a frozen target
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 0.25)  # existing grad kept as is
    existing_grad = model.fc1.weight.grad
    user_hook = model.bn.register_forward_hook(lambda *a: None)  # a user's hook survives

    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: _hook_dicts(m) for n, m in model.named_modules()}
    global_hooks = _global_hooks()
    torch.manual_seed(99)
    rng = torch.get_rng_state()

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g))] * 2
    targets = find_targets(model)
    crit = make_criterion(name, **({"fisher": fisher} if fisher else {}))
    scores = crit.score(model, CLS, targets, batches, generator=torch.Generator().manual_seed(1))

    assert set(scores) == set(targets)
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    after = model.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():  # bit-identical, buffers (running stats, counters) included
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert {n: _hook_dicts(m) for n, m in model.named_modules()} == hooks
    assert _global_hooks() == global_hooks
    assert model.fc1.weight.grad is existing_grad
    assert torch.equal(existing_grad, torch.full_like(existing_grad, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc1.weight")
    assert torch.equal(torch.get_rng_state(), rng)  # randomness only from the generator
    user_hook.remove()


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_scoring_is_deterministic(name):
    model = tiny_model()
    x, y = tiny_data()
    targets = find_targets(model)
    crit = make_criterion(name)
    a = crit.score(model, CLS, targets, [(x, y)], generator=torch.Generator().manual_seed(3))
    b = crit.score(model, CLS, targets, [(x, y)], generator=torch.Generator().manual_seed(3))
    assert _same(a, b)


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("bad", ["bogus", "OBD", ""])
def test_unknown_criterion_names_every_valid_one(bad):
    with pytest.raises(SettingError) as info:
        make_criterion(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert all(name in message for name in CRITERIA)


@pytest.mark.parametrize("lam", [-1.0, -1e-12, math.nan, math.inf])
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_bad_lambda_rejected(name, lam):
    with pytest.raises(SettingError, match="lambda"):
        make_criterion(name, lam=lam)


@pytest.mark.parametrize("name", ["qm", "obd", "obs"])
def test_unknown_fisher_or_labels_rejected(name):
    with pytest.raises(SettingError, match="diag.*ekfac.*kfac"):
        make_criterion(name, fisher="dense")
    with pytest.raises(SettingError, match="empirical.*exact.*sampled"):
        make_criterion(name, labels="true")


def test_default_labels_are_concrete():
    assert make_criterion("obd", fisher="diag").labels == "exact"
    assert make_criterion("obd", fisher="ekfac").labels == "exact"  # issue 16: bench_labels
