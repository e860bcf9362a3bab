"""lr='auto': the setting's parsing, the probe (leaves no trace, picks by validation), and
whole runs on an Adam-trained model: the chosen rate, and a final loss never worse than
right after pruning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from prunekit.data import Batches, load_data
from prunekit.errors import SettingError
from prunekit.finetune import (
    LR_CANDIDATES,
    FinetuneSettings,
    choose_lr,
    evaluate,
    finetune,
    lr_setting,
    probe_lr,
)
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

CLS = ClassificationTask()


@pytest.mark.parametrize(
    ("value", "want"),
    [("auto", "auto"), ("AUTO", "auto"), ("1e-3", 0.001), (0.05, 0.05), (1, 1.0), ("0.2", 0.2)],
)
def test_lr_setting_accepts_auto_and_positive_numbers(value, want):
    assert lr_setting(value) == want


@pytest.mark.parametrize("value", ["fast", "", "-1", -1, 0, 0.0, "nan", math.inf, True, None])
def test_lr_setting_refuses_anything_else_in_one_line(value):
    with pytest.raises(SettingError) as info:
        lr_setting(value, "--lr")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--lr {value!r}") and "'auto'" in message


def test_choose_lr_prefers_the_largest_rate_within_tolerance():
    def rows(*losses):
        return [{"lr": lr, "loss": x} for lr, x in zip(LR_CANDIDATES, losses, strict=True)]

    assert choose_lr(rows(0.5, 0.4, 0.3, 0.2, 0.9)) == 1e-2  # clear minimum
    assert choose_lr(rows(0.1137, 0.1138, 0.1139, 0.1148, 0.1158)) == 1e-2  # all within 1%
    assert choose_lr(rows(0.2, 0.15, 0.1487, 0.25, 1.0)) == 3e-3
    assert choose_lr(rows(1.0, 0.5, math.nan, math.inf, 0.5)) == 3e-2
    assert choose_lr(rows(*[math.nan] * 5)) == 3e-4  # everything diverged: the smallest


def small_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 4))
    masks = {"0.weight": torch.rand(12, 6, generator=g) > 0.5}
    with torch.no_grad():
        model[0].weight.mul_(masks["0.weight"])
    return model, masks, (x[:80], y[:80]), [(x[80:], y[80:])]


def test_the_probe_leaves_no_trace_and_reports_every_candidate():
    model, masks, train, val = small_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen = []

    def train_phase(phase, tick):
        seen.append((phase.lr, phase.steps, phase.lr_schedule))
        batches = Batches(*train, 20, torch.Generator().manual_seed(5))  # same for everyone
        finetune(model, CLS, batches, phase, masks=masks, progress=tick)

    validate = lambda: evaluate(model, CLS, val)  # noqa: E731
    ticks = []
    phase = FinetuneSettings(epochs=1, lr=0.1, lr_schedule="cosine")
    lr, table = probe_lr(model, train_phase, validate, phase, steps=6,
                         progress=lambda d, n: ticks.append((d, n)))  # fmt: skip
    assert seen == [(c, 6, "constant") for c in LR_CANDIDATES]
    assert [row["lr"] for row in table] == list(LR_CANDIDATES)
    assert lr == choose_lr(table)
    assert ticks[-1] == (30, 30) and len(ticks) == 30
    for k, v in model.state_dict().items():  # weights and BatchNorm buffers restored
        assert torch.equal(v, start[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    again = probe_lr(model, train_phase, validate, phase, steps=6)
    assert again == (lr, table)  # same batches, same start: the same table


# ------------------------------------------------------------ an Adam-trained model, end to end


@pytest.fixture(scope="module")
def adam_trained():
    """A 64-32-10 tanh MLP trained with AdamW on digits whose pixels are scaled to 0..100
    (unnormalised features, as a real model's often are): Adam does not care about the
    scale, but SGD at the old fixed default (0.01) is too large for it."""
    data = load_data("digits", seed=0)
    data = dataclasses.replace(data, x_train=data.x_train * 100, x_val=data.x_val * 100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    phase = FinetuneSettings(epochs=20, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    finetune(model, CLS, data.train_batches(50, torch.Generator().manual_seed(0)), phase)
    return model.state_dict(), data


def prune_adam_model(adam_trained, **kw):
    state, data = adam_trained
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    model.load_state_dict(state)
    cfg = {"criterion": "obd", "sparsity": 0.8, "steps": 3, "ntk": False, "score_examples": 300}
    return run_pruning(model, data, PruneSettings(**{**cfg, **kw})).report


def test_lr_auto_on_an_adam_trained_model(adam_trained):
    report = prune_adam_model(adam_trained)  # lr='auto' is the default
    ft = report["finetune"]
    assert ft["lr_setting"] == "auto" and ft["lr"] in LR_CANDIDATES
    probe = ft["lr_probe"]
    assert probe["step"] == 1 and probe["steps"] == 15 and probe["tolerance"] == 0.01
    losses = {row["lr"]: row["loss"] for row in probe["table"]}
    assert list(losses) == list(LR_CANDIDATES)
    # the large rates hurt this model (validation loss above where the probe started) ...
    assert losses[1e-2] > probe["loss_before"] and losses[3e-2] > probe["loss_before"]
    assert ft["lr"] < 1e-2 and ft["lr"] == choose_lr(probe["table"])  # ... and were avoided
    assert all(step["finetune_lr"] == ft["lr"] for step in report["steps"])
    for step in report["steps"]:  # no phase hands back a worse model than it started from
        assert step["loss_after_finetune"] <= step["loss_before_finetune"]
    metrics = report["metrics"]
    assert metrics["finetuned"]["loss"] <= metrics["pruned"]["loss"]
    assert ft["final"]["loss"] == metrics["finetuned"]["loss"] <= ft["final"]["loss_before"]


def test_the_old_fixed_rate_is_rolled_back_where_it_hurts(adam_trained):
    """lr 0.01 (the old default) makes step 1 worse on this model: that phase is rolled
    back, and the final loss is still not worse than right after pruning."""
    report = prune_adam_model(adam_trained, lr=0.01)
    ft = report["finetune"]
    assert ft["lr"] == 0.01 and ft["lr_probe"] is None and ft["lr_setting"] == 0.01
    first = report["steps"][0]
    assert first["finetune_kept"] == "start" and first["finetune_kept_iteration"] == 0
    assert first["loss_after_finetune"] == first["loss_before_finetune"]
    assert 1 in ft["rolled_back"]
    assert report["metrics"]["finetuned"]["loss"] <= report["metrics"]["pruned"]["loss"]
