"""Diagonal Fisher (exact / sampled / empirical labels) and mean gradient vs float64 oracles.

Oracles use nothing of prunekit's: per-example gradients come from torch.func (vmap of grad
of a functional_call), the true Fisher from the dense Gauss-Newton matrix J^T (diag p - p p^T) J
built from a jacrev Jacobian of the logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from prunekit.criteria import (
    ESTIMATORS,
    Diag,
    fit_curvature,
    fit_diag,
    mean_gradient,
    squared_gradient_sums,
)
from prunekit.errors import SettingError
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask, RegressionTask

CLS = ClassificationTask()
REG = RegressionTask()


class Bilinear(nn.Module):
    """A custom layer the hooks do not know; opts its weight in as a pruning target."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim_out, dim_in) / dim_in**0.5)

    def prunable_parameters(self):
        return ("w",)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w.T) * (x @ self.w.T)


class Twice(nn.Module):
    """Applies the same Linear twice (a shared layer: one module, two calls per forward)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def cnn2d() -> nn.Module:
    """Conv2d with stride/padding/dilation and a non-square kernel, then a grouped conv."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 6, 3),
    ).double()


def cnn1d() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4, 3),
    ).double()


def slow_path_model() -> nn.Module:
    """padding='same' conv and a custom layer: both go through the per-example loop."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Tanh(),
        nn.Flatten(),
        Bilinear(2 * 7 * 7, 6),
        nn.Linear(6, 3),
    ).double()


def shared_model() -> nn.Module:
    torch.manual_seed(4)
    return Twice().double()


MODELS = {
    "mlp": (mlp, (5,)),
    "cnn2d": (cnn2d, (2, 7, 7)),
    "cnn1d": (cnn1d, (2, 9)),
    "slow": (slow_path_model, (2, 7, 7)),
    "shared": (shared_model, (5,)),
}


def make(name: str, n: int = 7, seed: int = 10):
    factory, shape = MODELS[name]
    model = factory().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def per_example_grads(model, x, y, loss="ce") -> dict[str, Tensor]:
    """d loss_i / d theta for every example i, (N, *shape), by torch.func."""

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        if loss == "ce":
            return F.cross_entropy(out, yi.unsqueeze(0))
        return 0.5 * (out - yi.unsqueeze(0)).pow(2).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params_of(model), x, y)


def empirical_oracle(model, x, y, loss="ce") -> dict[str, Tensor]:
    return {k: v.pow(2).mean(0) for k, v in per_example_grads(model, x, y, loss).items()}


def true_fisher_oracle(model, x) -> dict[str, Tensor]:
    """Diagonal of the mean over examples of the dense GGN J^T (diag p - p p^T) J."""
    params = params_of(model)
    names = list(params)
    sizes = [params[n].numel() for n in names]
    total = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for xi in x:

        def logits(p, xi=xi):
            return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

        jac = jacrev(logits)(params)
        j = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)  # (C, P)
        p = torch.softmax(logits(params), -1)
        h = torch.diag(p) - torch.outer(p, p)
        total += j.T @ h @ j
    diag = (total / len(x)).diagonal()
    out, start = {}, 0
    for n, size in zip(names, sizes, strict=True):
        out[n] = diag[start : start + size].reshape(params[n].shape)
        start += size
    return out


def split(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], names, rtol=1e-10, atol=1e-13):
    assert set(names) <= set(got)
    for n in names:
        assert got[n].shape == want[n].shape, n
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_diag_equals_mean_squared_per_example_gradients(name):
    model, x, y = make(name)
    targets = find_targets(model)
    diag = fit_diag(model, CLS, targets, [(x, y)], labels="empirical")
    assert diag.examples == len(x) and diag.labels == "empirical"
    assert all(diag.values[n].dtype == torch.float64 for n in targets)
    assert_close(diag.diagonal(), empirical_oracle(model, x, y), targets)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_diag_equals_diagonal_of_dense_true_fisher(name):
    model, x, _ = make(name)
    targets = find_targets(model)
    oracle = true_fisher_oracle(model, x)
    diag = fit_diag(model, CLS, targets, [(x, torch.zeros(len(x), dtype=torch.long))])
    assert diag.labels == "exact"
    assert_close(diag.diagonal(), oracle, targets)
    assert all(float(oracle[n].abs().max()) > 1e-6 for n in targets)  # non-trivial oracle


def test_true_fisher_differs_from_empirical_fisher():
    """Guards the oracles: both estimators are not accidentally the same quantity."""
    model, x, y = make("mlp")
    targets = find_targets(model)
    exact = fit_diag(model, CLS, targets, [(x, y)], labels="exact").values
    emp = fit_diag(model, CLS, targets, [(x, y)], labels="empirical").values
    assert not torch.allclose(exact["0.weight"], emp["0.weight"], rtol=1e-3)


def test_sampled_diag_converges_to_exact_as_samples_grow():
    model, x, y = make("mlp", n=6)
    targets = find_targets(model)
    exact = fit_diag(model, CLS, targets, [(x, y)], labels="exact").values

    def rel_error(k: int, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        got = fit_diag(model, CLS, targets, [(x, y)], labels="sampled", samples=k, generator=gen)
        num = sum(float((got.values[n] - exact[n]).pow(2).sum()) for n in targets)
        den = sum(float(exact[n].pow(2).sum()) for n in targets)
        return (num / den) ** 0.5

    few = sum(rel_error(1, s) for s in range(3)) / 3
    many = rel_error(400, 0)
    assert many < 0.15
    assert many < few / 4


def test_sampled_diag_uses_the_explicit_generator_only():
    model, x, y = make("mlp")
    targets = find_targets(model)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return fit_diag(model, CLS, targets, [(x, y)], labels="sampled", samples=3, generator=gen)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a.values[n], b.values[n]) for n in targets)
    assert not all(torch.equal(a.values[n], c.values[n]) for n in targets)


@pytest.mark.parametrize("labels", ["exact", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "cnn2d", "slow", "shared"])
def test_batch_size_invariance(name, labels):
    """One batch of N == N batches of one == uneven splits (per-example semantics)."""
    model, x, y = make(name, n=7)
    targets = find_targets(model)
    one = fit_diag(model, CLS, targets, [(x, y)], labels=labels)
    assert one.examples == 7
    for sizes in ([1] * 7, [3, 4], [5, 2]):
        other = fit_diag(model, CLS, targets, split(x, y, sizes), labels=labels)
        assert other.examples == 7
        assert_close(other.values, one.values, targets)


def test_squared_gradient_sums_are_sums_not_means():
    model, x, y = make("mlp")
    targets = find_targets(model)
    sums, seen = squared_gradient_sums(model, CLS, targets, split(x, y, [3, 4]), "empirical")
    assert seen == 7
    oracle = empirical_oracle(model, x, y)
    assert_close(sums, {n: v * 7 for n, v in oracle.items()}, targets)


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "cnn1d", "slow"])
def test_mean_gradient_equals_torch_func_mean_gradient(name):
    model, x, y = make(name, n=7)
    targets = find_targets(model)
    names = [n for n, _ in model.named_parameters()]  # biases too
    got = mean_gradient(model, CLS, names, split(x, y, [3, 4]))  # uneven batches
    want = {k: v.mean(0) for k, v in per_example_grads(model, x, y).items()}
    assert_close(got, want, names)
    assert set(targets) <= set(got)


def test_regression_empirical_and_sampled_use_the_gaussian_nll():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    targets = find_targets(model)
    emp = fit_diag(model, REG, targets, [(x, y)], labels="empirical")
    assert_close(emp.values, empirical_oracle(model, x, y, loss="mse"), targets)
    # true Fisher of a unit-variance Gaussian = GGN with identity output Hessian = E[J^2]
    jac = vmap(
        jacrev(lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)),
        in_dims=(None, 0),
    )(params_of(model), x)
    ggn = {n: jac[n].pow(2).sum(1).mean(0) for n in targets}
    gen = torch.Generator().manual_seed(1)
    sampled = fit_diag(model, REG, targets, [(x, y)], labels="sampled", samples=2000, generator=gen)
    assert_close(sampled.values, ggn, targets, rtol=0.1, atol=1e-3)


def test_exact_labels_on_a_regression_task_raise_setting_error():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    targets = find_targets(model)
    with pytest.raises(SettingError, match="exact.*regression|regression.*exact"):
        fit_diag(model, REG, targets, [batch], labels="exact")
    with pytest.raises(SettingError, match="exact"):
        fit_curvature("diag", model, REG, targets, [batch], labels="exact")


@pytest.mark.parametrize("labels", ["bogus", "EXACT"])
def test_unknown_labels_raise_setting_error_naming_valid(labels):
    model, x, y = make("mlp")
    with pytest.raises(SettingError, match="empirical.*exact.*sampled"):
        fit_diag(model, CLS, find_targets(model), [(x, y)], labels=labels)


@pytest.mark.parametrize(
    "samples",
    [
        0,
        -1,
        1.5,
        float("nan"),
        float("inf"),
        None,
    ],
)
def test_bad_sample_counts_raise(samples):
    model, x, y = make("mlp")
    with pytest.raises(SettingError, match="samples"):
        fit_diag(model, CLS, find_targets(model), [(x, y)], labels="sampled", samples=samples)


def test_empty_data_raises():
    from prunekit.errors import DataError

    model, _, _ = make("mlp")
    with pytest.raises(DataError):
        fit_diag(model, CLS, find_targets(model), [], labels="exact")


def test_fit_curvature_diag_returns_the_oracle_diagonal():
    model, x, y = make("cnn2d")
    targets = find_targets(model)
    curv = fit_curvature("diag", model, CLS, targets, split(x, y, [4, 3]))
    assert isinstance(curv, Diag)
    assert curv.labels == "exact"  # the diag estimator's default on a classifier
    assert curv.estimators() == {n: "diag" for n in targets}
    assert_close(curv.diagonal(), true_fisher_oracle(model, x), targets)
    emp = fit_curvature("diag", model, CLS, targets, [(x, y)], labels="empirical")
    assert_close(emp.diagonal(), empirical_oracle(model, x, y), targets)
    # regression defaults to sampled labels for diag (exact does not exist there)
    reg_model = nn.Sequential(nn.Linear(3, 2)).double()
    reg_batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    reg = fit_curvature("diag", reg_model, REG, find_targets(reg_model), [reg_batch])
    assert reg.labels == "sampled"


def test_fit_curvature_unknown_estimator_names_valid_ones():
    model, x, y = make("mlp")
    with pytest.raises(SettingError, match="diag.*ekfac.*kfac"):
        fit_curvature("dense", model, CLS, find_targets(model), [(x, y)])


def test_float32_model_accumulates_in_float32_close_to_float64():
    model64, x, y = make("cnn2d")
    targets = find_targets(model64)
    want = fit_diag(model64, CLS, targets, [(x, y)]).values
    model32 = cnn2d().float().eval()
    got = fit_diag(model32, CLS, targets, [(x.float(), y)]).values
    for n in targets:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-7)


def test_inplace_activation_after_a_hooked_layer_changes_nothing():
    """ReLU(inplace=True) after a Linear must not rebase the recorded output (or its input)."""
    import copy

    from torch import nn

    from prunekit.criteria import fit_curvature

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    targets = find_targets(plain)
    for estimator in ("diag", "kfac", "ekfac"):
        want = fit_curvature(estimator, plain, CLS, targets, [(x, y)], labels="empirical")
        got = fit_curvature(estimator, inplace, CLS, targets, [(x, y)], labels="empirical")
        for name in targets:
            torch.testing.assert_close(got.diagonal()[name], want.diagonal()[name])


def test_slow_path_examples_leave_no_recordings_behind(monkeypatch):
    """While the per-example slow path runs, the capture hooks record nothing."""
    from torch import nn

    from prunekit.criteria import capture as capture_mod

    recorders = []
    real = capture_mod.capture

    def spy(model, names):
        cm = real(model, names)
        rec = cm.__enter__()
        recorders.append(rec)

        class Wrapped:
            def __enter__(self):
                return rec

            def __exit__(self, *exc):
                sizes.append(sum(len(v) for v in rec.outputs.values()))
                return cm.__exit__(*exc)

        return Wrapped()

    sizes: list[int] = []
    import prunekit.criteria.fisher as fisher_mod

    monkeypatch.setattr(fisher_mod, "capture", spy)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.register_module("extra", nn.Identity())
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    targets = find_targets(model)
    # force every target onto the slow path by pretending no module is hookable
    monkeypatch.setattr(fisher_mod, "_fast_modules", lambda m, t: {"0.weight": "0"})
    fit_diag(model, CLS, targets, [(x, y)], labels="empirical")
    assert recorders and all(r.active for r in recorders)
    assert sizes == [0]  # cleared before the slow path, nothing recorded during it


def test_default_labels_exact_up_to_32_classes_else_sampled():
    from prunekit.criteria.curvature import EXACT_MAX_CLASSES, default_labels

    assert EXACT_MAX_CLASSES == 32
    for est in ESTIMATORS:
        assert default_labels(est) == "exact"  # a classifier of unknown size
        assert default_labels(est, CLS) == "exact"
        assert default_labels(est, CLS, classes=32) == "exact"
        assert default_labels(est, CLS, classes=33) == "sampled"
        assert default_labels(est, REG) == "sampled"  # no 'exact' without categories
        assert default_labels(est, REG, classes=4) == "sampled"


@pytest.mark.parametrize(("classes", "want"), [(3, "exact"), (40, "sampled")])
def test_fit_curvature_reads_the_class_count_off_the_outputs(classes, want):
    from prunekit.criteria.curvature import output_classes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, classes)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    batches = [(x, torch.randint(0, classes, (6,)))]
    assert output_classes(model, CLS, batches) == classes
    assert output_classes(model, REG, batches) is None
    assert output_classes(model, CLS, []) is None
    for est in ("diag", "ekfac"):
        curv = fit_curvature(est, model, CLS, find_targets(model), iter(batches))
        assert curv.labels == want  # a one-shot iterable is still fitted on every batch
        assert curv.examples == 6
