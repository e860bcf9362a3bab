"""Wanda: |W| * input-feature norm vs float64 oracles, no trace, batching, end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit
from prunekit.criteria import CRITERIA, Wanda, make_criterion
from prunekit.data import load_data
from prunekit.errors import SettingError
from prunekit.models import mlp
from prunekit.preflight import validate
from prunekit.prune.targets import find_targets
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask, Task

CLS = ClassificationTask()


class SeqMLP(nn.Module):
    """Linear layers on (N, T, D) tokens, mean-pooled, then a head on (N, H)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.tanh(self.fc1(x)))).mean(1))


class ConvNet(nn.Module):
    """A grouped padded conv, a strided conv and a Linear head (inputs (N, 2, 6, 6))."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 3, 2, stride=2, bias=False)
        self.fc = nn.Linear(27, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class RNNNet(nn.Module):
    """A GRU (recurrent targets: the magnitude fallback) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


def _batches(shape: tuple[int, ...], sizes=(3, 5, 1), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


def _score(model: nn.Module, batches, task: Task = CLS):
    result = Wanda().evaluate(model, task, find_targets(model), batches)
    return result.scores, result.estimators


def _oracle(weight: Tensor, sq: Tensor) -> Tensor:
    """|W| * sqrt(sq) with sq the per-column sums, sq shaped like weight.reshape(out, -1)[0]
    or (out, i) when rows differ (grouped convs)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    return (w.abs() * sq.sqrt()).reshape(weight.shape)


def test_linear_scores_equal_the_float64_oracle_over_tokens_and_batches():
    torch.manual_seed(0)
    model = SeqMLP().double()
    batches = _batches((4, 5))  # (N, T=4, D=5)
    scores, est = _score(model, batches)
    sq = {n: 0.0 for n in ("fc1", "fc2", "head")}
    with torch.no_grad():
        for x, _ in batches:
            h1 = torch.tanh(model.fc1(x))
            h2 = torch.relu(model.fc2(h1)).mean(1)
            sq["fc1"] = sq["fc1"] + x.pow(2).sum(dim=(0, 1))
            sq["fc2"] = sq["fc2"] + h1.pow(2).sum(dim=(0, 1))
            sq["head"] = sq["head"] + h2.pow(2).sum(dim=0)
    assert set(scores) == {f"{m}.weight" for m in sq}
    for m, s in sq.items():
        got = scores[f"{m}.weight"]
        assert got.dtype == torch.float64
        torch.testing.assert_close(
            got, _oracle(getattr(model, m).weight, s), rtol=1e-10, atol=1e-10
        )
    assert est == {f"{m}.weight": "wanda" for m in sq}


def _unfold_sq(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """(out, C_in/groups * k*k) per-row column sums of squared im2col patches, per group."""
    g, per_in, per_out = (
        conv.groups,
        conv.in_channels // conv.groups,
        conv.out_channels // conv.groups,
    )
    rows = []
    for k in range(g):
        cols = F.unfold(
            x[:, k * per_in : (k + 1) * per_in], conv.kernel_size, padding=conv.padding,
            stride=conv.stride, dilation=conv.dilation,
        )  # fmt: skip
        rows.append(cols.pow(2).sum(dim=(0, 2)).expand(per_out, -1))
    return torch.cat(rows)


def test_conv_scores_equal_the_float64_oracle_on_unfolded_patches():
    torch.manual_seed(0)
    model = ConvNet().double()
    batches = _batches((2, 6, 6))
    scores, est = _score(model, batches)
    sq = {"c1": 0.0, "c2": 0.0, "fc": 0.0}
    with torch.no_grad():
        for x, _ in batches:
            h1 = torch.tanh(model.c1(x))
            h2 = torch.relu(model.c2(h1)).flatten(1)
            sq["c1"] = sq["c1"] + _unfold_sq(x, model.c1)
            sq["c2"] = sq["c2"] + _unfold_sq(h1, model.c2)
            sq["fc"] = sq["fc"] + h2.pow(2).sum(0)
    for m, s in sq.items():
        want = _oracle(getattr(model, m).weight, s)
        torch.testing.assert_close(scores[f"{m}.weight"], want, rtol=1e-10, atol=1e-10)
    assert set(est.values()) == {"wanda"}
    # ||X_j||^2 = N * A_jj: the KFAC A factor's diagonal, times the examples seen
    kfac = prunekit.criteria.fit_kfac(model, CLS, find_targets(model), batches, labels="exact")
    a = kfac.A["c2.weight"]  # (groups=1, i, i); c2 has no bias column
    n = sum(x.shape[0] for x, _ in batches)
    torch.testing.assert_close(n * torch.diagonal(a[0]), sq["c2"][0], rtol=1e-10, atol=1e-10)


def test_one_batch_of_n_equals_n_batches_of_one():
    torch.manual_seed(0)
    for model, shape in ((SeqMLP().double(), (3, 5)), (ConvNet().double(), (2, 6, 6))):
        ((x, y),) = _batches(shape, sizes=(6,))
        whole, _ = _score(model, [(x, y)])
        single, _ = _score(model, [(x[i : i + 1], y[i : i + 1]) for i in range(6)])
        for name in whole:
            torch.testing.assert_close(single[name], whole[name], rtol=1e-12, atol=1e-12)


def test_padded_positions_are_left_out():
    class Padded(ClassificationTask):
        def position_mask(self, batch):
            mask = torch.ones(batch[0].shape[:2], dtype=torch.bool)
            mask[0, 2:] = False
            return mask

    torch.manual_seed(0)
    model = SeqMLP().double()
    ((x, y),) = _batches((4, 5), sizes=(2,))
    scores, _ = _score(model, [(x, y)], Padded())
    want = x[0, :2].pow(2).sum(0) + x[1].pow(2).sum(0)
    torch.testing.assert_close(
        scores["fc1.weight"], _oracle(model.fc1.weight, want), rtol=1e-10, atol=1e-10
    )


def test_recurrent_targets_fall_back_to_magnitude_and_say_so():
    torch.manual_seed(0)
    model = RNNNet().double()
    scores, est = _score(model, _batches((3, 4)))
    params = dict(model.named_parameters())
    assert est == {
        "rnn.weight_ih_l0": "magnitude",
        "rnn.weight_hh_l0": "magnitude",
        "fc.weight": "wanda",
    }
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        assert torch.equal(scores[name], params[name].detach().abs())


def _model_state(model: nn.Module):
    hooks = {
        n: sum(
            len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        )
        for n, m in model.named_modules()
    }
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        hooks,
    )


@pytest.mark.parametrize("training", [True, False])
def test_scoring_leaves_no_trace(training):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, 3)
    )
    model.train(training)
    model[4].bias.requires_grad_(False)
    batches = [(torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)))] * 2
    state, flags, requires, hooks = _model_state(model)
    rng = torch.get_rng_state()
    a = Wanda().score(model, CLS, find_targets(model), batches)
    b = Wanda().score(model, CLS, find_targets(model), batches)
    new_state, new_flags, new_requires, new_hooks = _model_state(model)
    assert set(new_state) == set(state)
    for k, v in state.items():  # running statistics and counters untouched (eval mode)
        assert torch.equal(new_state[k], v), k
    assert (new_flags, new_requires, new_hooks) == (flags, requires, hooks)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[n], b[n]) for n in a)  # dropout off: deterministic


def test_registered_and_idle_options_refused():
    assert CRITERIA["wanda"] is Wanda and isinstance(make_criterion("wanda"), Wanda)
    assert not Wanda.uses_curvature and not Wanda.uses_gradient
    with pytest.raises(SettingError, match="does nothing with criterion 'wanda'"):
        make_criterion("wanda", lam=0.1)
    data = load_data("synthetic?n=60&dim=8&classes=3")
    for settings, flag in (
        ({"fisher": "ekfac"}, "--fisher"),
        ({"labels": "exact"}, "--fisher-labels"),
    ):
        with pytest.raises(SettingError, match=f"{flag} .* does nothing with criterion 'wanda'"):
            validate(PruneSettings(criterion="wanda", **settings), mlp("8,6,3"), data, CLS)
    crit, _, targets = validate(PruneSettings(criterion="wanda"), mlp("8,6,3"), data, CLS)
    assert isinstance(crit, Wanda) and len(targets) == 2


def test_the_api_prunes_digits_to_the_exact_sparsity():
    torch.manual_seed(0)
    model = mlp("64,16,10")
    scores = prunekit.score(model, "digits", criterion="wanda", examples=50)
    assert set(scores) == {"1.weight", "3.weight"}
    result = prunekit.prune(
        model, "digits", criterion="wanda", sparsity=0.5, steps=2, finetune_epochs=0,
        final_epochs=0,
    )  # fmt: skip
    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    assert kept == total // 2 and total == 64 * 16 + 16 * 10
    assert result.report["criterion"] == "wanda" and result.report["fisher"] is None
    assert result.report["estimators"] == {"1.weight": "wanda", "3.weight": "wanda"}
    for name, mask in result.masks.items():
        assert bool((dict(model.named_parameters())[name][~mask] == 0).all())


def test_the_cli_refuses_fisher_with_wanda_in_one_line(tmp_path, digits_model_file, cli):
    code, stdout, stderr = cli(
        "prune", digits_model_file, "--criterion", "wanda", "--fisher", "ekfac",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 2, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--fisher 'ekfac'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_cli_prunes_with_wanda(tmp_path, digits_model_file, cli):
    out = tmp_path / "run"
    code, _, stderr = cli(
        "prune", digits_model_file, "--criterion", "wanda", "--sparsity", "0.5", "--steps", "1",
        "--finetune-epochs", "0", "--final-epochs", "0", "--no-ntk", "--quiet", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "wanda" and report["sparsity"]["global"] == 0.5
    assert set(report["estimators"].values()) == {"wanda"}
