"""The mask-respecting fine-tuning loop and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.data import Batches
from prunekit.errors import SettingError
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.prune.masks import next_masks
from prunekit.types import ClassificationTask, RegressionTask

CLS = ClassificationTask()


def easy_data(n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()  # 4 classes
    return x, y


def model_and_masks(seed: int = 0):
    """A tiny MLP and 60% masks that prune the weights with the LARGEST gradients.

    Those weights would move most (and build the most momentum) if nothing stopped them.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = easy_data()
    loss = CLS.loss(model(x), (x, y))
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    scores = {n: -g.abs() for n, g in zip(names, grads, strict=True)}  # big gradient = prune
    masks = next_masks(
        scores, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, 0.6
    )
    return model, masks


@pytest.mark.parametrize(
    "settings",
    [
        FinetuneSettings(epochs=3, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=0.05),
        FinetuneSettings(epochs=3, optimizer="adamw", lr=0.05, weight_decay=0.1),
        FinetuneSettings(epochs=3, lr=0.2, lr_schedule="cosine", grad_clip=0.5),
    ],
    ids=["sgd-momentum-wd", "adamw", "cosine-clip"],
)
def test_pruned_weights_stay_exactly_zero_and_the_rest_trains(settings):
    model, masks = model_and_masks()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    x, y = easy_data()
    checked = []

    def on_step(step):  # after every optimizer step, not only at the end
        for n, m in masks.items():
            assert bool((params[n][~m] == 0).all()), (n, step)
        checked.append(step)

    result = finetune(
        model,
        CLS,
        Batches(x, y, 20, torch.Generator().manual_seed(0)),
        settings,
        masks,
        on_step=on_step,
    )
    assert result["steps"] == 30 == len(checked)
    for n, m in masks.items():
        w = params[n].detach()
        assert int((w == 0).sum()) >= int((~m).sum())
        assert bool((w[~m] == 0).all())
        assert torch.count_nonzero(w[~m]) == 0
        changed = (w[m] != before[n][m]).float().mean()
        assert changed > 0.9, n  # unpruned weights really moved
    assert not torch.equal(params["0.bias"], before["0.bias"])
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_loss_decreases_on_an_easy_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = easy_data(400)
    val = Batches(x[300:], y[300:], 50, None)
    start = evaluate(model, CLS, val)
    result = finetune(
        model,
        CLS,
        Batches(x[:300], y[:300], 25, torch.Generator().manual_seed(1)),
        FinetuneSettings(epochs=10, lr=0.1),
    )
    end = evaluate(model, CLS, val)
    assert end["loss"] < 0.6 * start["loss"]
    assert end["accuracy"] > 0.8 > start["accuracy"]
    assert result["steps"] == 120 and math.isfinite(result["loss"]) and result["seconds"] >= 0


@pytest.mark.parametrize(
    ("epochs", "steps", "want"),
    [(5.0, 7, 7), (0.5, None, 5), (2.5, None, 25), (0.0, None, 0), (3.0, 0, 0), (0.0, 13, 13)],
)
def test_steps_override_epochs_exactly(epochs, steps, want):
    model, _ = model_and_masks()
    x, y = easy_data(100)  # 10 batches of 10 per epoch
    seen = []
    before = [p.detach().clone() for p in model.parameters()]
    result = finetune(
        model,
        CLS,
        Batches(x, y, 10, torch.Generator().manual_seed(0)),
        FinetuneSettings(epochs=epochs, steps=steps),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result["steps"] == want
    assert seen == [(k, want) for k in range(1, want + 1)]
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert moved == (want > 0)


def test_generator_of_batches_makes_finetuning_reproducible():
    def run():
        model, masks = model_and_masks()
        x, y = easy_data()
        batches = Batches(x, y, 20, torch.Generator().manual_seed(5))
        finetune(model, CLS, batches, FinetuneSettings(epochs=1), masks)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_training_and_averages_per_example(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model.train(training)
    x, y = easy_data(35)
    running = model[1].running_mean.clone()
    got = evaluate(model, CLS, Batches(x, y, 10, None))  # uneven last batch of 5
    assert model.training == training and model[1].training == training
    assert torch.equal(model[1].running_mean, running)  # evaluated in eval mode
    model.eval()
    with torch.no_grad():
        logits = model(x)
    want_loss = float(nn.functional.cross_entropy(logits, y))
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_evaluate_regression_has_no_accuracy():
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    got = evaluate(model, RegressionTask(), [(x, y)])
    assert got["accuracy"] is None
    with torch.no_grad():
        want = float(0.5 * (model(x) - y).pow(2).sum(1).mean())
    assert got["loss"] == pytest.approx(want, rel=1e-5)


def test_evaluate_on_empty_data_raises():
    with pytest.raises(SettingError, match="empty"):
        evaluate(nn.Linear(3, 2), CLS, [])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "adamw, sgd"),
        ({"lr_schedule": "step"}, "constant, cosine"),
        ({"epochs": -1.0}, "epochs"),
        ({"epochs": math.nan}, "epochs"),
        ({"epochs": math.inf}, "epochs"),
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "learning rate"),
        ({"lr": -0.1}, "learning rate"),
        ({"lr": math.nan}, "learning rate"),
    ],
)
def test_bad_settings_raise_setting_error(kwargs, match):
    with pytest.raises(SettingError, match=match):
        FinetuneSettings(**kwargs)
