"""A fine-tuning phase never hands back a model worse on validation than it started from.

``PhaseGuard`` snapshots the weights (and buffers: BatchNorm statistics) at the start of a
phase, evaluates at a few checkpoints within it and at its end, and restores the weights
with the lowest validation loss. Every snapshot is taken between optimizer steps, after
the masks were re-applied, so a restored model is exactly as sparse as the masks say.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from prunekit.errors import SettingError

#: what a phase handed back: its last weights, an earlier checkpoint's, or its start's
KEPT = ("end", "checkpoint", "start")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()`` (parameters and buffers), same device."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``snapshot``) back into ``model`` in place."""
    model.load_state_dict(state)


def _loss(metrics: dict) -> float:
    """The validation loss used to compare weights; NaN/Inf (a diverged phase) count as +inf."""
    value = float(metrics["loss"])
    return value if math.isfinite(value) else math.inf


def checkpoint_iterations(total: int, checkpoints: int) -> list[int]:
    """Iterations (optimizer steps, 1..total) at which a phase of ``total`` steps is
    evaluated: ``checkpoints`` evenly spaced ones, the last being ``total`` (the end)."""
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise SettingError(f"fine-tuning checkpoints {checkpoints!r} must be an integer >= 1")
    if total <= 0:
        return []
    return sorted({max(1, round(total * k / checkpoints)) for k in range(1, checkpoints + 1)})


class PhaseGuard:
    """Keeps the best weights of one fine-tuning phase (lowest validation loss).

    model: the module being trained (unwrapped); validate(): evaluates it now (a dict with
    at least 'loss'); before: the evaluation of the weights the phase starts from; total:
    optimizer steps the phase will run; checkpoints: evaluations within the phase, the end
    included (1 = the end only). Call ``step(iteration)`` after every optimizer step and
    ``finish()`` once at the end. Ties go to the later weights (more training).
    """

    def __init__(self, model: nn.Module, validate: Callable[[], dict], before: dict,
                 total: int, checkpoints: int = 1):  # fmt: skip
        self.model, self.validate, self.before = model, validate, before
        self.when = set(checkpoint_iterations(total, checkpoints)) - {total}
        self.best, self.best_iteration = before, 0
        self.best_state = snapshot(model)
        self.iterations = 0

    def _offer(self, iteration: int, metrics: dict, keep_state: bool) -> None:
        if _loss(metrics) <= _loss(self.best):
            self.best, self.best_iteration = metrics, iteration
            self.best_state = snapshot(self.model) if keep_state else None

    def step(self, iteration: int) -> None:
        """After optimizer step ``iteration`` (1-based): evaluate if it is a checkpoint."""
        self.iterations = iteration
        if iteration in self.when:
            self._offer(iteration, self.validate(), keep_state=True)

    def finish(self) -> dict:
        """Evaluate the end weights, restore the best ones; returns the outcome:
        ``kept`` ('end', 'checkpoint', 'start'), ``kept_iteration`` (0 = the start),
        ``iterations`` (steps run), ``loss_before`` and ``metrics`` (of the weights kept)."""
        end = self.validate() if self.iterations > 0 else self.before
        self._offer(self.iterations, end, keep_state=False)
        if self.best_state is not None:  # the end is not the best: roll back
            restore(self.model, self.best_state)
        kept = (
            "end" if self.best_iteration == self.iterations
            else "start" if self.best_iteration == 0 else "checkpoint"
        )  # fmt: skip
        self.best_state = None
        return {
            "kept": kept,
            "kept_iteration": self.best_iteration,
            "iterations": self.iterations,
            "loss_before": float(self.before["loss"]),
            "metrics": self.best,
        }
