"""Recurrent zoo: BN-LSTM equations, per-step statistics, gradient flow, masks kept zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.checkpoint import build_model
from prunekit.errors import SettingError
from prunekit.finetune import FinetuneSettings, finetune
from prunekit.models import BNLSTM, CELLS, EXAMPLES, SeqBatchNorm, SequenceClassifier, lstm
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

EPS = 1e-5


def _bn(x, mean, var, gamma, beta=0.0):
    return (x - mean) / torch.sqrt(var + EPS) * gamma + beta


def _randomise(layer: BNLSTM, seed: int = 0) -> None:
    """Non-trivial γ, β and bias so that every term of the equations matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.2)


def _by_hand(layer: BNLSTM, x: torch.Tensor, stats=None) -> torch.Tensor:
    """Cooijmans et al.'s equations written out; stats(name, t) -> (mean, var) or None (batch)."""
    cell = layer.cell
    n, steps, _ = x.shape
    hid = cell.hidden_size
    h = torch.zeros(n, hid, dtype=x.dtype)
    c = torch.zeros(n, hid, dtype=x.dtype)
    outs = []

    def norm(v, name, t, gamma, beta=0.0):
        if stats is None:
            mean, var = v.mean(0), v.var(0, unbiased=False)
        else:
            mean, var = stats(name, t)
        return _bn(v, mean, var, gamma, beta)

    for t in range(steps):
        wh = h @ cell.weight_hh.T
        wx = x[:, t] @ cell.weight_ih.T
        pre = (
            norm(wh, "bn_hh", t, cell.bn_hh.weight)
            + norm(wx, "bn_ih", t, cell.bn_ih.weight)
            + cell.bias
        )
        i, f, g, o = (
            pre[:, :hid],
            pre[:, hid : 2 * hid],
            pre[:, 2 * hid : 3 * hid],
            pre[:, 3 * hid :],
        )
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(norm(c, "bn_c", t, cell.bn_c.weight, cell.bn_c.bias))
        outs.append(h)
    return torch.stack(outs, 1)


def test_bnlstm_training_forward_equals_the_equations_with_per_step_batch_statistics():
    torch.manual_seed(0)
    layer = BNLSTM(3, 2, max_steps=4).double().train()
    _randomise(layer)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    out, (h, c) = layer(x)
    want = _by_hand(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, want[:, -1])
    # statistics shared over time would give something else
    assert not torch.allclose(layer.cell.bn_ih.running_mean[0], layer.cell.bn_ih.running_mean[1])


def test_bnlstm_eval_forward_uses_per_step_population_statistics():
    torch.manual_seed(1)
    layer = BNLSTM(3, 2, max_steps=3).double().eval()
    _randomise(layer, 1)
    g = torch.Generator().manual_seed(2)
    for bn in (layer.cell.bn_ih, layer.cell.bn_hh, layer.cell.bn_c):
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    x = torch.randn(4, 5, 3, dtype=torch.float64)  # 5 steps > T_max = 3: clamped at step 2
    bns = {"bn_ih": layer.cell.bn_ih, "bn_hh": layer.cell.bn_hh, "bn_c": layer.cell.bn_c}

    def stats(name, t):
        s = min(t, 2)
        return bns[name].running_mean[s], bns[name].running_var[s]

    out, _ = layer(x)
    torch.testing.assert_close(out, _by_hand(layer, x, stats), rtol=1e-12, atol=1e-12)

    def unclamped(name, t):
        return bns[name].running_mean[t % 3], bns[name].running_var[t % 3]

    assert not torch.allclose(out[:, 3:], _by_hand(layer, x, unclamped)[:, 3:])


def test_population_statistics_clamp_beyond_t_max_and_are_not_updated_there():
    bn = SeqBatchNorm(4, max_steps=3, gamma=1.0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(12.0).reshape(3, 4))
    bn.eval()
    x = torch.randn(6, 4)
    torch.testing.assert_close(bn(x, 7), bn(x, 2))
    torch.testing.assert_close(bn(x, 3), bn(x, 2))
    assert not torch.allclose(bn(x, 2), bn(x, 1))
    bn.train()
    before = bn.running_mean.clone()
    bn(x, 5)  # beyond T_max: normalised with its own batch statistics, stores nothing
    assert torch.equal(bn.running_mean, before)
    assert bn.num_batches_tracked.tolist() == [0, 0, 0]
    bn(x, 1)
    assert bn.num_batches_tracked.tolist() == [0, 1, 0]
    torch.testing.assert_close(bn.running_mean[1], 0.9 * before[1] + 0.1 * x.mean(0))


def test_bn_scales_start_at_one_tenth_and_shifts_at_zero():
    cell = BNLSTM(3, 5, max_steps=2).cell
    for bn in (cell.bn_ih, cell.bn_hh, cell.bn_c):
        assert torch.all(bn.weight == 0.1)
    assert cell.bn_ih.bias is None and cell.bn_hh.bias is None  # b carries the bias
    assert torch.all(cell.bn_c.bias == 0)
    assert cell.bias.shape == (20,)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_flow_through_time_to_the_first_step(cell):
    torch.manual_seed(0)
    model = lstm(input_size=4, hidden=6, classes=3, cell=cell, rows=7).train()
    x = torch.randn(8, 7, 4, requires_grad=True)
    model(x).logsumexp(-1).sum().backward()
    first = x.grad[:, 0].abs().sum()
    assert float(first) > 1e-6
    assert all(p.grad is not None for n, p in model.named_parameters() if "weight" in n)


@pytest.mark.parametrize("cell", CELLS)
def test_factory_reads_images_row_by_row_and_exposes_recurrent_targets(cell):
    spec = f"prunekit.models:lstm?input_size=8&hidden=5&classes=10&cell={cell}&rows=8"
    model = build_model(spec).eval()
    imgs = torch.randn(3, 1, 8, 8)
    out = model(imgs)
    assert out.shape == (3, 10)
    torch.testing.assert_close(model(imgs[:, 0]), out)
    targets = find_targets(model)
    kinds = {n: t.kind for n, t in targets.items()}
    assert kinds.pop("head.weight") == "linear"
    assert len(kinds) == 2 and set(kinds.values()) == {"recurrent"}
    assert all(("weight_ih" in n) or ("weight_hh" in n) for n in kinds)


@pytest.mark.parametrize(
    "kwargs",
    [{"cell": "rnn"}, {"hidden": 0}, {"rows": "eight"}, {"cell": "bnlstm", "layers": 2},
     {"gamma": -1.0}],
)  # fmt: skip
def test_factory_rejects_bad_settings(kwargs):
    with pytest.raises(SettingError):
        lstm(**kwargs)


def test_examples_build_and_fit_their_data_shapes():
    for name in ("lstm-digits", "bnlstm-digits", "lstm-mnist", "bnlstm-mnist"):
        ex = EXAMPLES[name]
        model = build_model(ex.arch)
        assert isinstance(model, SequenceClassifier)
        side = 8 if ex.data == "digits" else 28
        assert model.eval()(torch.zeros(2, 1, side, side)).shape == (2, 10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "bnlstm"])
def test_pruned_recurrent_weights_stay_zero_through_repacking_and_finetuning(cell):
    torch.manual_seed(0)
    model = lstm(input_size=4, hidden=8, classes=3, cell=cell, rows=5)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=gen) > 0.7 for n in targets}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    if isinstance(model.rnn, nn.RNNBase):
        model.rnn.flatten_parameters()  # re-pack into the flat buffer cuDNN would use
    x, y = torch.randn(64, 5, 4), torch.randint(0, 3, (64,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    before = {n: params[n].detach().clone() for n in targets}
    settings = FinetuneSettings(steps=12, lr=0.1, momentum=0.9, weight_decay=1e-3)
    finetune(model, ClassificationTask(), batches, settings, masks=masks)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0), n
        assert not torch.equal(params[n][m], before[n][m]), n  # the survivors did train
    if isinstance(model.rnn, nn.RNNBase):  # the module computes with the masked weights
        fresh = lstm(input_size=4, hidden=8, classes=3, cell=cell, rows=5).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model.eval()(x), fresh(x))
