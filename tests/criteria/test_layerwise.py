"""criteria.layerwise: sequential layer-wise pruning vs a brute-force float64 reconstruction."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.criteria.layerwise import LayerwiseResult, prune_layerwise
from prunekit.criteria.obc import sparsegpt_rows
from prunekit.errors import DataError, SettingError
from prunekit.prune.targets import find_targets

D = torch.float64


class MLP(nn.Module):
    """6-5-4-3 tanh; modules declared in reverse order of use (the forward decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 3)
        self.hidden = nn.Linear(5, 4)
        self.inp = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=1, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class RNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def forward(model: nn.Module, batch) -> Tensor:
    return model(batch[0])


def batches(shape: tuple[int, ...], seed: int, n: int = 3, size: int = 24) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g, dtype=D), None) for _ in range(n)]


def make(cls, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cls().double()


def layer_inputs(model: nn.Module, module: nn.Module, data: list) -> Tensor:
    """Inputs of ``module`` over all batches, plain hooks (not prunekit's), (N, features)."""
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in data:
            model(b[0])
    handle.remove()
    return torch.cat(seen)


def brute_force(dense: Tensor, bias: Tensor | None, x: Tensor, keep: Tensor) -> Tensor:
    """Rows refitted by lstsq: kept weights (+ bias) of each row that best reproduce the
    dense row's outputs on x (N, i); returns the (o, i[+1]) block, removed entries 0."""
    if bias is not None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
        dense = torch.cat([dense, bias[:, None]], 1)
        keep = torch.cat([keep, torch.ones(len(keep), 1, dtype=torch.bool)], 1)
    out = torch.zeros_like(dense)
    target = x @ dense.T
    for r in range(len(dense)):
        cols = keep[r].nonzero().flatten()
        out[r, cols] = torch.linalg.lstsq(x[:, cols], target[:, r : r + 1]).solution[:, 0]
    return out


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_exact_solver_equals_brute_force_reconstruction_layer_by_layer():
    model = make(MLP, 0)
    dense = copy.deepcopy(model)
    targets = find_targets(model)
    data = batches((6,), seed=1)
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
    masks["inp.weight"][0, :2] = False  # already pruned: stays pruned
    counts = {"inp.weight": 14, "hidden.weight": 11, "out.weight": 6}
    model.train()
    steps = []
    state = torch.random.get_rng_state()
    result = prune_layerwise(
        model,
        forward,
        targets,
        data,
        counts,
        masks,
        solver="exact",
        damping=1e-12,
        progress=lambda done, total, name: steps.append((done, total, name)),
    )
    assert isinstance(result, LayerwiseResult) and result.solver == "exact"
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and no_hooks(model)
    assert [s[2] for s in steps] == ["inp.weight", "hidden.weight", "out.weight"]
    assert steps[-1][:2] == (3, 3) and result.fallback == ()
    assert not result.masks["inp.weight"][0, :2].any()
    for name in ("inp", "hidden", "out"):
        keep = result.masks[f"{name}.weight"]
        assert int((~keep).sum()) == counts[f"{name}.weight"]
        layer, old = getattr(model, name), getattr(dense, name)
        x = layer_inputs(model, layer, data)  # inputs of the pruned network before it
        want = brute_force(old.weight.detach(), old.bias.detach(), x, keep)
        got = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert bool((layer.weight[~keep] == 0).all())
        y_old, y_new = old(x).detach(), layer(x).detach()
        rel = float((y_old - y_new).pow(2).sum() / y_old.pow(2).sum())
        assert result.reconstruction[f"{name}.weight"] == pytest.approx(rel, rel=1e-6, abs=1e-12)


def test_sparsegpt_solver_counts_and_beats_magnitude_without_update():
    model = make(MLP, 2)
    baseline = copy.deepcopy(model)
    targets = find_targets(model)
    data = batches((6,), seed=3)
    counts = {n: t.numel // 2 for n, t in targets.items()}
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
    model.eval()
    result = prune_layerwise(model, forward, targets, data, counts, masks, block=2)
    assert result.solver == "sparsegpt" and not model.training and no_hooks(model)
    assert all(int((~result.masks[n]).sum()) == c for n, c in counts.items())
    for name, keep in result.masks.items():
        assert bool((dict(model.named_parameters())[name][~keep] == 0).all())
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        y = baseline(x)
        for name, p in baseline.named_parameters():
            if name in counts:  # magnitude, same counts, no update
                k = p.abs().reshape(-1).sort(stable=True).indices[: counts[name]]
                p.view(-1)[k] = 0
        gap = (model(x) - y).pow(2).sum()
        assert gap < (baseline(x) - y).pow(2).sum()
    assert all(0 <= e < 1 for e in result.reconstruction.values())


def test_conv2d_exact_equals_brute_force_on_patches():
    model = make(ConvNet, 4)
    dense = copy.deepcopy(model)
    targets = find_targets(model)
    data = batches((2, 4, 4), seed=5, size=8)
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
    counts = {"conv.weight": 30, "head.weight": 40}
    result = prune_layerwise(
        model, forward, targets, data, counts, masks, solver="exact", damping=1e-12
    )
    keep = result.masks["conv.weight"]
    assert int((~keep).sum()) == 30 and int((~result.masks["head.weight"]).sum()) == 40
    x = layer_inputs(model, model.conv, data)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    want = brute_force(
        dense.conv.weight.reshape(3, -1), dense.conv.bias, patches, keep.reshape(3, -1)
    )
    got = torch.cat([model.conv.weight.reshape(3, -1), model.conv.bias[:, None]], 1).detach()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_lstm_targets_fall_back_to_magnitude_without_update():
    model = make(RNN, 6)
    before = copy.deepcopy(model)
    targets = find_targets(model)
    data = batches((5, 3), seed=7, size=10)
    counts = {n: t.numel // 3 for n, t in targets.items()}
    result = prune_layerwise(model, forward, targets, data, counts, {}, solver="exact")
    lstm = [n for n in targets if n.startswith("lstm.")]
    assert lstm and set(result.fallback) == set(lstm)
    assert set(result.reconstruction) == {"head.weight"}
    for name in lstm:
        old = dict(before.named_parameters())[name].detach()
        new = dict(model.named_parameters())[name].detach()
        keep = result.masks[name]
        assert int((~keep).sum()) == counts[name]
        assert torch.equal(new, old * keep)  # no update
        assert old.abs()[~keep].max() <= old.abs()[keep].min()
    assert no_hooks(model)


@pytest.mark.parametrize(
    ("counts", "settings", "words"),
    [
        ({"inp.weight": 31}, {}, "larger than the 30"),
        ({"inp.weight": -1}, {}, ">= 0"),
        ({"inp.weight": 1}, {}, "below the 2"),
        ({"nope.weight": 1}, {}, "not a target"),
        ({"inp.weight": 3}, {"solver": "obc"}, "unknown layer-wise solver 'obc'"),
        ({"inp.weight": 3}, {"damping": -1.0}, "damping -1.0"),
        ({"inp.weight": 3}, {"block": 0}, "block 0"),
        ({"inp.weight": 3}, {"damping": 0.0}, "layer 'inp.weight'.*not positive definite"),
    ],
)
def test_bad_inputs_are_one_line_setting_errors(counts, settings, words):
    model = make(MLP, 8)
    targets = find_targets(model)
    masks = {"inp.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["inp.weight"][0, :2] = False
    data = batches((6,), seed=9, size=2, n=1)  # 2 examples: H of 7 columns is singular
    with pytest.raises(SettingError, match=words) as info:
        prune_layerwise(model, forward, targets, data, counts, masks, **settings)
    assert "\n" not in str(info.value) and no_hooks(model)


def test_no_calibration_data_is_a_data_error():
    model = make(MLP, 10)
    with pytest.raises(DataError, match="no calibration batches"):
        prune_layerwise(model, forward, find_targets(model), [], {"inp.weight": 3}, {})


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 2, groups=2)
        self.head = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("solver", ["exact", "sparsegpt"])
def test_grouped_conv_is_pruned_per_group_with_one_count(solver):
    model = make(Grouped, 11)
    dense = copy.deepcopy(model)
    targets = find_targets(model)
    data = batches((4, 4, 4), seed=12, size=10)
    counts = {"conv.weight": 19}
    result = prune_layerwise(
        model, forward, targets, data, counts, {}, solver=solver, damping=1e-12
    )
    keep = result.masks["conv.weight"]
    assert int((~keep).sum()) == 19 and result.fallback == ()
    assert "head.weight" not in result.masks  # no count: left alone
    assert torch.equal(model.head.weight, dense.head.weight)
    x = layer_inputs(model, model.conv, data)
    got = model.conv.weight.detach()
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        patches = F.unfold(x[:, rows], 2).transpose(1, 2).reshape(-1, 8)
        w = dense.conv.weight[rows].reshape(2, -1).detach()
        want = brute_force(w, dense.conv.bias[rows].detach(), patches, keep[rows].reshape(2, -1))
        block = torch.cat([got[rows].reshape(2, -1), model.conv.bias[rows, None].detach()], 1)
        if solver == "exact":
            torch.testing.assert_close(block, want, atol=1e-6, rtol=0)
        else:  # the adaptive choice made inside equals a run with the final mask fixed
            a = torch.cat([patches, torch.ones(len(patches), 1, dtype=D)], 1)
            mask = torch.cat([keep[rows].reshape(2, -1), torch.ones(2, 1, dtype=torch.bool)], 1)
            dense_block = torch.cat([w, dense.conv.bias[rows, None].detach()], 1)
            fixed, _ = sparsegpt_rows(dense_block, a.T @ a, int((~mask).sum()), mask, damping=1e-12)
            torch.testing.assert_close(block, fixed, atol=1e-9, rtol=0)
