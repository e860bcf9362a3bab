"""Batch-norm recalibration: re-estimate running statistics after pruning.

Pruning changes every pre-activation distribution, so the population statistics a BN layer
learned on the dense network are stale. ``recalibrate_bn`` resets them and recomputes them
as a cumulative average (momentum None) over training batches, with BN layers in train mode
and everything else (dropout, ...) in eval mode, without gradients. Modules with per-step
statistics (prunekit's SeqBatchNorm inside BN-LSTM) are recalibrated per time step by the
same protocol: they are found by duck typing, not by class, so this room imports no model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import DataError
from prunekit.types import Batch, batch_inputs, batch_size, batch_to

Forward = Callable[[nn.Module, Batch], Any]


def _is_bn(module: nn.Module) -> bool:
    """A module with running statistics that ``reset_running_stats`` + momentum control."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    return (
        callable(getattr(module, "reset_running_stats", None))
        and hasattr(module, "momentum")
        and isinstance(getattr(module, "running_mean", None), torch.Tensor)
    )


def batchnorm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every BN layer with running statistics (nn.BatchNorm*, SeqBatchNorm)."""
    return {name: m for name, m in model.named_modules() if _is_bn(m)}


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BN layer with running statistics (recalibration applies)."""
    return bool(batchnorm_modules(model))


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Batch],
    forward: Forward | None = None,
    max_batches: int | None = None,
) -> dict:
    """Re-estimate the running statistics of every BN layer of ``model`` in place.

    batches: training batches ``(inputs, targets)`` (or bare inputs); forward(model, batch):
    how to run the model (e.g. ``task.forward``), default ``model(inputs)``; max_batches:
    stop after this many (None = all). Statistics are reset, then averaged with equal weight
    per batch (per time step for per-step BN). Parameters, ``.grad`` and every module's
    ``.training`` flag are left as they were. Returns {'batches', 'examples', 'modules'
    (names recalibrated)}; with no BN layer nothing runs and 'batches' is 0. Raises
    DataError when there is BN but no batch (the old statistics are then kept).
    """
    bns = batchnorm_modules(model)
    if not bns:
        return {"batches": 0, "examples": 0, "modules": []}
    run = forward or (lambda net, batch: net(batch_inputs(batch)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = {m: m.training for m in model.modules()}
    momenta = {name: m.momentum for name, m in bns.items()}
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in bns.items()}
    seen = examples = 0
    try:
        model.eval()
        for m in bns.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                batch = batch_to(batch, device)
                run(model, batch)
                seen, examples = seen + 1, examples + batch_size(batch)
    finally:
        for name, m in bns.items():
            m.momentum = momenta[name]
            if seen == 0:  # nothing was averaged: keep the previous statistics
                m.load_state_dict(saved[name])
        for m, flag in flags.items():
            m.training = flag
    if seen == 0:
        raise DataError("BN recalibration needs at least one training batch; the data is empty")
    return {"batches": seen, "examples": examples, "modules": sorted(bns)}
