"""PhaseGuard: a fine-tuning phase hands back its best weights on validation, masks kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.data import Batches
from prunekit.errors import SettingError
from prunekit.finetune import FinetuneSettings, PhaseGuard, checkpoint_iterations, evaluate
from prunekit.finetune import finetune as run_phase
from prunekit.prune.masks import apply_masks
from prunekit.types import ClassificationTask

CLS = ClassificationTask()


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    return x, y


TRAIN, VAL = data(200, 0), data(100, 1)


def setup(seed: int = 0):
    """A tiny MLP with BatchNorm (buffers must come back too) and 50% random masks."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=gen) > 0.5 for n in ("0.weight", "3.weight")}
    apply_masks(model, masks)
    return model, masks


def validate_of(model):
    return lambda: evaluate(model, CLS, [VAL])


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def guarded(model, masks, lr: float, steps: int, checkpoints: int = 1) -> dict:
    validate = validate_of(model)
    guard = PhaseGuard(model, validate, validate(), steps, checkpoints)
    batches = Batches(*TRAIN, 20, torch.Generator().manual_seed(0))
    phase = FinetuneSettings(steps=steps, lr=lr, momentum=0.9, weight_decay=0.0)
    run_phase(model, CLS, batches, phase, masks=masks, on_step=guard.step)
    return guard.finish()


def test_a_phase_that_makes_validation_worse_is_rolled_back_exactly():
    model, masks = setup()
    start = state(model)
    before = validate_of(model)()
    outcome = guarded(model, masks, lr=50.0, steps=10)  # diverges
    assert outcome["kept"] == "start" and outcome["kept_iteration"] == 0
    assert outcome["iterations"] == 10 and outcome["loss_before"] == before["loss"]
    now = state(model)
    assert now.keys() == start.keys()
    for k, v in start.items():  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(now[k], v), k
    assert outcome["metrics"] == before
    assert validate_of(model)()["loss"] == before["loss"]


def test_a_phase_that_helps_keeps_its_end_weights_and_the_masks():
    model, masks = setup()
    before = validate_of(model)()["loss"]
    outcome = guarded(model, masks, lr=0.05, steps=30)
    assert outcome["kept"] == "end" and outcome["kept_iteration"] == 30
    assert outcome["metrics"]["loss"] < before
    assert validate_of(model)()["loss"] == outcome["metrics"]["loss"]
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert bool((params[name][~keep] == 0).all()), name


def test_a_checkpoint_within_the_phase_is_kept_when_it_beats_the_end(monkeypatch):
    """Validation losses scripted: start 1.0, checkpoint (iteration 5) 0.5, end 0.8; the
    checkpoint's weights come back, and they are the weights the model had at step 5."""
    model, masks = setup()
    losses = iter([0.5, 0.8])
    at_five = {}

    def validate():
        loss = next(losses)
        if loss == 0.5:
            at_five.update(state(model))
        return {"loss": loss, "accuracy": None}

    guard = PhaseGuard(model, validate, {"loss": 1.0, "accuracy": None}, 10, checkpoints=2)
    batches = Batches(*TRAIN, 20, torch.Generator().manual_seed(0))
    phase = FinetuneSettings(steps=10, lr=0.05, weight_decay=0.0)
    run_phase(model, CLS, batches, phase, masks=masks, on_step=guard.step)
    outcome = guard.finish()
    assert (outcome["kept"], outcome["kept_iteration"], outcome["iterations"]) == (
        "checkpoint", 5, 10
    )  # fmt: skip
    assert outcome["metrics"]["loss"] == 0.5
    for k, v in state(model).items():
        assert torch.equal(v, at_five[k]), k


def test_ties_and_non_finite_losses():
    model, _ = setup()
    calls = iter([{"loss": 1.0}])
    guard = PhaseGuard(model, lambda: next(calls), {"loss": 1.0}, 3)
    for it in (1, 2, 3):
        guard.step(it)
    assert guard.finish()["kept"] == "end"  # a tie goes to the trained weights
    guard = PhaseGuard(model, lambda: {"loss": float("nan")}, {"loss": 2.0}, 1)
    guard.step(1)
    assert guard.finish()["kept"] == "start"  # a diverged (NaN) phase is rolled back


def test_checkpoint_iterations():
    assert checkpoint_iterations(10, 1) == [10]
    assert checkpoint_iterations(10, 2) == [5, 10]
    assert checkpoint_iterations(3, 5) == [1, 2, 3]
    assert checkpoint_iterations(0, 3) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SettingError, match="checkpoints"):
            checkpoint_iterations(10, bad)
