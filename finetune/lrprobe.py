"""``lr='auto'``: choose the fine-tuning learning rate by a short probe.

Each candidate rate trains the model for a few optimizer steps (same optimizer, same
batches, masks respected) from the same starting weights, which are restored after each
candidate. The winner is the largest rate whose validation loss is within
``PROBE_TOLERANCE`` (1%, relative) of the lowest: the probe runs at the first phase, when
little has been pruned and a well-trained model is near its optimum, so every rate may
land within a hair of it, and the smallest would then win on noise -- too small for the
later steps, which have more to recover (a rate that is too large is caught by
``PhaseGuard``, one that is too small is not). A rate that measurably hurts is never
chosen: a pretrained model wants the rate its own optimizer left it at, which no fixed
default knows (SGD at 0.01 can undo an Adam-trained model that 1e-3 fine-tunes well).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from prunekit.errors import SettingError
from prunekit.finetune.guard import restore, snapshot
from prunekit.finetune.loop import FinetuneSettings

#: candidate learning rates, log-spaced by ~3 (SGD with momentum and AdamW alike)
LR_CANDIDATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: optimizer steps each candidate trains for (fewer when the phase itself is shorter)
PROBE_STEPS = 20
#: a candidate within this fraction of the lowest probe loss counts as equally good
PROBE_TOLERANCE = 0.01
AUTO = "auto"


def lr_setting(value, flag: str = "lr") -> float | str:
    """A learning-rate setting as ``'auto'`` or a float > 0; SettingError (one line naming
    ``flag``) otherwise. Strings are parsed ('1e-3' -> 0.001), as typed on a command line."""
    number = value
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            number = float(value)
        except ValueError:
            number = None
    ok = isinstance(number, numbers.Real) and not isinstance(number, bool)
    if not ok or not math.isfinite(number) or number <= 0:
        raise SettingError(
            f"{flag} {value!r} must be 'auto' (probe a few rates at the first fine-tune) or "
            "a finite number > 0, e.g. 0.001"
        )
    return float(number)


def choose_lr(table: list[dict], tolerance: float = PROBE_TOLERANCE) -> float:
    """The largest ``lr`` of ``table`` rows ({'lr', 'loss'}) whose loss is within
    ``tolerance`` (relative) of the lowest finite loss; the smallest rate when none is
    finite (every candidate diverged)."""
    finite = [r for r in table if math.isfinite(r["loss"])]
    if not finite:
        return min(r["lr"] for r in table)
    best = min(r["loss"] for r in finite)
    return max(r["lr"] for r in finite if r["loss"] <= best + tolerance * abs(best))


def probe_lr(
    model: nn.Module,
    train: Callable[[FinetuneSettings, Callable[[int, int], None] | None], object],
    validate: Callable[[], dict],
    settings: FinetuneSettings,
    candidates: Iterable[float] = LR_CANDIDATES,
    steps: int = PROBE_STEPS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, list[dict]]:
    """Train from the current weights at each candidate rate, keep none of it.

    train(phase, progress): runs one fine-tuning phase of ``phase`` on ``model`` (the
    caller's batches, masks re-applied after every step; each call must see the same
    batches in the same order); validate(): evaluates ``model`` now (dict with 'loss').
    settings: the phase the probe stands for (optimizer, momentum, weight decay); each
    candidate runs it at a constant rate for ``steps`` optimizer steps. The weights, the
    buffers and torch's global random state are restored afterwards. Returns (the chosen
    rate, ``choose_lr``: the largest within ``PROBE_TOLERANCE`` of the lowest validation
    loss; the table: one {'lr', 'loss', 'accuracy'} per candidate, in candidate order).
    """
    candidates = [lr_setting(lr, "probe candidate") for lr in candidates]
    if not candidates or steps < 1:
        raise SettingError("the learning-rate probe needs candidates and steps >= 1")
    start = snapshot(model)
    table, done, total = [], 0, len(candidates) * steps
    tick = None
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        for lr in candidates:
            phase = replace(settings, lr=lr, steps=steps, lr_schedule="constant")
            if progress:
                tick = lambda k, _n, base=done: progress(base + k, total)  # noqa: E731
            try:
                train(phase, tick)
                metrics = validate()
            finally:
                restore(model, start)
            done += steps
            row = {"lr": lr, "loss": float(metrics["loss"]), "accuracy": metrics.get("accuracy")}
            table.append(row)
    return choose_lr(table), table


def _cuda_devices(model: nn.Module) -> list:
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return sorted(d.index or 0 for d in devices)
