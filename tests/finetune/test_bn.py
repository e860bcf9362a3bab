"""BN recalibration: exact cumulative statistics, per time step, restores a stale loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import DataError
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.finetune.bn import batchnorm_modules, has_batchnorm, recalibrate_bn
from prunekit.models import lstm, mlp
from prunekit.types import ClassificationTask

TASK = ClassificationTask()


def bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5),
                         nn.Linear(6, 3))  # fmt: skip


def test_has_batchnorm_sees_nn_batchnorm_and_per_step_bn_only():
    assert has_batchnorm(bn_mlp())
    assert has_batchnorm(lstm(cell="bnlstm"))
    assert has_batchnorm(lstm(cell="bnrnn"))
    assert not has_batchnorm(lstm(cell="lstm"))
    assert not has_batchnorm(mlp("4,3"))
    untracked = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    assert not has_batchnorm(untracked)
    assert sorted(batchnorm_modules(lstm(cell="bnlstm"))) == [
        "rnn.cell.bn_c", "rnn.cell.bn_hh", "rnn.cell.bn_ih"
    ]  # fmt: skip


def test_statistics_are_the_equal_weight_average_of_batch_statistics_and_state_is_restored():
    model = bn_mlp()
    model.train()
    model[3].eval()  # a mixed state that must come back exactly
    bn = model[1]
    bn.momentum = 0.3
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=g) * 2 + 1, torch.zeros(n)) for n in (5, 9, 7)]
    info = recalibrate_bn(model, batches)
    assert info == {"batches": 3, "examples": 21, "modules": ["1"]}
    with torch.no_grad():
        pre = [model[0](x) for x, _ in batches]
    torch.testing.assert_close(bn.running_mean, torch.stack([p.mean(0) for p in pre]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([p.var(0) for p in pre]).mean(0))
    assert bn.momentum == 0.3 and model.training and not model[3].training
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bnlstm_statistics_are_recalibrated_per_time_step():
    torch.manual_seed(0)
    model = lstm(input_size=3, hidden=4, classes=2, cell="bnlstm", rows=4).eval()
    bn_ih = model.rnn.cell.bn_ih
    g = torch.Generator().manual_seed(2)
    # each step has its own input scale, so shared statistics could not match them all
    scale = torch.tensor([0.5, 1.0, 3.0, 6.0]).view(1, 4, 1)
    batches = [(torch.randn(16, 4, 3, generator=g) * scale, torch.zeros(16)) for _ in range(3)]
    info = recalibrate_bn(model, batches, forward=TASK.forward, max_batches=2)
    assert info["batches"] == 2 and info["examples"] == 32
    assert bn_ih.num_batches_tracked.tolist() == [2, 2, 2, 2]
    for t in range(4):
        proj = [x[:, t] @ model.rnn.cell.weight_ih.T for x, _ in batches[:2]]
        want = torch.stack([p.mean(0) for p in proj]).mean(0)
        torch.testing.assert_close(bn_ih.running_mean[t], want, rtol=1e-5, atol=1e-6)
    assert not model.training and not bn_ih.training


def test_no_batchnorm_runs_nothing_and_empty_data_keeps_old_statistics():
    calls = []
    info = recalibrate_bn(mlp("4,3"), [(torch.zeros(2, 4), None)], lambda m, b: calls.append(1))
    assert info["batches"] == 0 and calls == []
    model = bn_mlp()
    with torch.no_grad():
        model[1].running_mean.fill_(0.7)
    with pytest.raises(DataError):
        recalibrate_bn(model, [])
    assert torch.all(model[1].running_mean == 0.7) and model[1].momentum == 0.1


def _sequences(n: int, seed: int):
    """Class = sign of the sum of the last step's features; 6 steps of 3 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    return x, (x[:, -1].sum(-1) > 0).long()


@pytest.mark.parametrize("cell", ["bnlstm", "bnrnn"])
def test_recalibration_restores_the_loss_after_an_input_shift(cell):
    torch.manual_seed(0)
    model = lstm(input_size=3, hidden=16, classes=2, cell=cell, rows=6)
    x, y = _sequences(512, 0)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    finetune(model, TASK, batches, FinetuneSettings(epochs=8, lr=0.5, weight_decay=0.0))
    xv, yv = _sequences(256, 1)
    base = evaluate(model, TASK, [(xv, yv)])["loss"]
    # the sensor changed gain and offset: the stored statistics are now stale
    shift = lambda v: v * 3.0 + 2.0  # noqa: E731
    stale = evaluate(model, TASK, [(shift(xv), yv)])["loss"]
    recalibrate_bn(model, [(shift(bx), by) for bx, by in batches], forward=TASK.forward)
    fixed = evaluate(model, TASK, [(shift(xv), yv)])["loss"]
    assert base < 0.45  # the model learned the task
    assert stale > base + 0.2
    assert fixed < stale - 0.2 and fixed < base + 0.1
