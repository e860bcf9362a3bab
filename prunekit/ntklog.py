"""The NTK alignment log of a run: fixed train/validation probes, one ntk.jsonl record per call.

Whether a run logs at all: ``--ntk`` on (refused when the model/task/data cannot support
it), ``--no-ntk`` or the default off. Off by default because an analysis on by default may
cost at most 15% of the run, and this one cannot: one record (two kernels on 100-example
probes) takes about as long as a whole fine-tuning epoch of a small MLP on digits, and a
10-step run makes 22 records (BENCHMARKS.md, "NTK log overhead": 2.9-3.9x the run without
it). ``NTK_DEFAULT_HINT`` is what report.json and the plots say about turning it on.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prunekit.analysis import ntk_alignment, ntk_record, select_probe
from prunekit.criteria.capture import capture
from prunekit.data import DataBundle
from prunekit.errors import SettingError
from prunekit.settings import PruneSettings
from prunekit.types import Masks, Target, Task

log = logging.getLogger(__name__)

NTK_MAX_OUTPUTS = 10
NTK_MAX_WEIGHTS = 500_000
NTK_DEFAULT_HINT = (
    "NTK alignment not logged: off by default (it costs 1-5x the run); pass --ntk "
    "(recipe: analysis.ntk: true, API: ntk=True) to log it"
)


def ntk_is_cheap(num_outputs: int, target_weights: int) -> bool:
    """At most NTK_MAX_OUTPUTS outputs and NTK_MAX_WEIGHTS target weights: beyond that, an
    asked-for log is warned about (its kernels grow as (outputs * probe examples)^2)."""
    return num_outputs <= NTK_MAX_OUTPUTS and target_weights <= NTK_MAX_WEIGHTS


def _kernel_targets(y):
    """The NTK alignment's targets: the labels, or a distillation's teacher outputs."""
    return y["teacher"] if isinstance(y, dict) else y


class NtkLog:
    """Alignment on fixed train/validation probes, one ntk.jsonl record per call."""

    def __init__(self, model, task, data: DataBundle, settings: PruneSettings, targets):
        self.model, self.names = model, list(targets)
        self.kind = "classification" if data.kind == "classification" else "regression"
        self.probe = select_probe(
            data.n_train,
            data.n_val,
            settings.probe_train,
            settings.probe_val,
            seed=settings.seed,
        )
        device = next(model.parameters()).device
        self.train = (
            data.x_train[self.probe["train"]].to(device),
            _kernel_targets(data.y_train)[self.probe["train"]].to(device),
        )
        self.val = (
            data.x_val[self.probe["val"]].to(device),
            _kernel_targets(data.y_val)[self.probe["val"]].to(device),
        )
        self.records: list[dict] = []

    def __call__(self, step: int, phase: str, iteration, sparsity: float, masks: Masks) -> float:
        """Log one record; returns the training-probe alignment."""
        results = [
            ntk_alignment(
                self.model,
                x,
                y,
                masks=masks,
                targets_kind=self.kind,
                params=self.names,
                memory_budget_mb=1024.0,
                capture=capture,  # Linear layers through the exact factored kernel
            )
            for x, y in (self.train, self.val)
        ]
        self.records.append(ntk_record(step, phase, iteration, sparsity, *results))
        return results[0]["alignment"]


def ntk_log_for(
    model: nn.Module,
    task: Task,
    data: DataBundle,
    settings: PruneSettings,
    targets: dict[str, Target],
) -> NtkLog | None:
    """The run's NTK log, or None: ``settings.ntk`` True (SettingError when the model, task
    or data cannot support it; a warning when it is not ``ntk_is_cheap``), else None (off,
    the default: see the module docstring)."""
    if not settings.ntk:
        return None
    unsupported = _ntk_unsupported(model, task, data)
    if unsupported:
        raise SettingError(f"--ntk needs {unsupported}; use --no-ntk")
    classifier = data.kind == "classification"
    outputs = data.num_classes if classifier else _kernel_targets(data.y_train)[0].numel()
    if not ntk_is_cheap(outputs, sum(t.numel for t in targets.values())):
        log.warning(
            "--ntk on %d outputs and %d target weights: the log may take longer than the run",
            outputs, sum(t.numel for t in targets.values()),
        )  # fmt: skip
    return NtkLog(model, task, data, settings, targets)


def _ntk_unsupported(model: nn.Module, task: Task, data: DataBundle) -> str | None:
    """Why the NTK log cannot run on this model/task/data, or None when it can."""
    if isinstance(model, torch.jit.ScriptModule):
        return "an eager nn.Module, not a TorchScript archive"
    if isinstance(data.x_train, dict) or data.y_train is None:
        return "tensor inputs and targets (this data has dict inputs or no targets)"
    runner = task.base if task.kind == "distill" else task
    if type(runner) is not Task and runner.kind not in ("classification", "regression"):
        return f"a built-in task (outputs = model(inputs)), not a {runner.kind!r} task"
    return None
