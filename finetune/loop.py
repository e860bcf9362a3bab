"""The short, mask-respecting training loop run between pruning steps, and evaluation.

Pruned weights stay exactly zero: gradients are masked before the optimizer step and the
weights are multiplied by their masks after it, so neither momentum nor weight decay can
revive them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import SettingError, choice_error
from prunekit.prune.masks import apply_masks
from prunekit.types import Batch, Masks, Task, batch_size, batch_to

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning phase.

    epochs: passes over the training batches (fractions allowed); steps: if set, the
    exact number of optimizer steps instead (overrides epochs); lr: peak learning rate;
    lr_schedule: 'constant' or 'cosine' (decays to 0 over the phase); momentum and
    weight_decay as in torch.optim; grad_clip: max global grad norm (None = off).
    """

    epochs: float = 1.0
    steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise choice_error("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr_schedule not in LR_SCHEDULES:
            raise choice_error("lr schedule", self.lr_schedule, LR_SCHEDULES)
        if not (self.epochs >= 0) or math.isinf(self.epochs):
            raise SettingError(f"fine-tuning epochs {self.epochs!r} must be a finite number >= 0")
        if self.steps is not None and self.steps < 0:
            raise SettingError(f"fine-tuning steps {self.steps!r} must be >= 0")
        if not (self.lr > 0):
            raise SettingError(f"learning rate {self.lr!r} must be > 0")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps in this phase."""
        if self.steps is not None:
            return int(self.steps)
        return int(round(self.epochs * batches_per_epoch))


def make_optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    """A fresh optimizer over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def _lr_at(settings: FinetuneSettings, step: int, total: int) -> float:
    if settings.lr_schedule == "cosine" and total > 0:
        return 0.5 * settings.lr * (1.0 + math.cos(math.pi * step / total))
    return settings.lr


def _batches_forever(batches: Iterable[Batch]):
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def _masked_step(model, optimizer, params, masks, settings) -> None:
    if masks:
        for name, mask in masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask)
    if settings.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    if masks:
        apply_masks(model, masks)


def finetune(
    model: nn.Module,
    task: Task,
    batches: Iterable[Batch],
    settings: FinetuneSettings,
    masks: Masks | None = None,
    progress: Progress | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for one phase, keeping masked weights at exactly zero.

    batches: re-iterable training batches (reshuffled by their own generator each pass);
    masks: name -> bool (True = keep), or None to train every weight; progress(done,
    total) after each step; on_step(step) after each step (e.g. NTK logging). Returns
    {'steps', 'seconds', 'loss'} where loss is the mean training loss of the phase.
    Leaves the model in eval mode; ``.grad`` is cleared at the end.
    """
    per_epoch = len(batches) if hasattr(batches, "__len__") else 1
    total = settings.total_steps(per_epoch)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    masks = {n: m.to(device) for n, m in masks.items()} if masks else None
    if masks:
        apply_masks(model, masks)
    optimizer = make_optimizer(model, settings)
    # the loss is summed on the device: a float() per step would sync a GPU every step
    start, loss_sum, done = time.perf_counter(), torch.zeros((), device=device), 0
    model.train()
    stream = _batches_forever(batches)
    for step, batch in zip(range(total), stream, strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(settings, step, total)
        batch = batch_to(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(task.forward(model, batch), batch)
        loss.backward()
        _masked_step(model, optimizer, params, masks, settings)
        loss_sum, done = loss_sum + loss.detach().float(), done + 1
        if progress:
            progress(done, total)
        if on_step:
            on_step(done)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    mean_loss = float(loss_sum) / max(done, 1)
    return {"steps": done, "seconds": time.perf_counter() - start, "loss": mean_loss}


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: Iterable[Batch]) -> dict[str, float | None]:
    """Means per example of the task's metrics: ``loss``, ``accuracy`` (from ``correct``;
    None without it) and any other sum the task reports (e.g. ``cosine``), in eval mode.

    The model's ``.training`` flag is restored afterwards.
    """
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    sums: dict[str, float] = {}
    seen = 0
    try:
        for batch in batches:
            batch = batch_to(batch, device)
            for key, value in task.metrics(task.forward(model, batch), batch).items():
                sums[key] = sums.get(key, 0.0) + value
            seen += batch_size(batch)
    finally:
        model.train(was_training)
    if seen == 0:
        raise SettingError("cannot evaluate on empty data")
    accuracy = sums["correct"] / seen if "correct" in sums else None
    out = {"loss": sums["loss"] / seen, "accuracy": accuracy}
    out.update({k: v / seen for k, v in sums.items() if k not in ("loss", "correct")})
    return out
