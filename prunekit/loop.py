"""The pruning loop of design.md section 4: what a reader opens to see the algorithm.

    task, data  <- prepare_task (distillation: the dense outputs become the targets)
    validate every setting against model and data        (preflight.validate)
    for target sparsity s_k in schedule(final, steps, kind):
        scores = criterion.evaluate(model, task, targets, score batches)
        masks  = next_masks(scores, masks, s_k, scope)      # exact count, monotone
        apply masks; (OBS compensation; BatchNorm recalibration)
        fine-tune, masks re-applied after every optimizer step
        metrics row (+ NTK alignment); checkpoint the step (resume)
    final fine-tune; report

``run_pruning`` is the whole loop; ``_prune_step`` is one step; ``_Run`` holds what
changes while it runs (the settings are frozen).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.analysis import log_spaced_iterations
from prunekit.criteria.obs import obs_update
from prunekit.data import DataBundle
from prunekit.distill import prepare_task
from prunekit.finetune import evaluate, finetune
from prunekit.finetune.bn import has_batchnorm, recalibrate_bn
from prunekit.ntklog import NtkLog, ntk_log_for
from prunekit.preflight import validate
from prunekit.prune.masks import apply_masks, full_masks, next_masks, sparsity_of
from prunekit.ranks import RankSlice, label_key, rank_and_world, score_batches_of
from prunekit.report import build_report, task_report
from prunekit.resume import restore_state, resume_plan, save_state
from prunekit.settings import Progress, PruneResult, PruneSettings, resolve_device
from prunekit.types import Masks, Target, Task

log = logging.getLogger("prunekit")


def _eval(model: nn.Module, task: Task, data: DataBundle) -> dict:
    return evaluate(model, task, data.val_batches())


@dataclass
class _Run:
    """Mutable state of one pruning run (kept out of the frozen settings)."""

    model: nn.Module
    task: Task
    data: DataBundle
    settings: PruneSettings
    targets: dict[str, Target]
    masks: Masks
    gen: torch.Generator
    progress: Progress | None
    ntk: NtkLog | None = None
    rows: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    estimators: dict[str, str] = field(default_factory=dict)
    use_recalibration: bool = False
    dense: dict | None = None
    pruned: dict | None = None

    def obs_deltas(self, curvature) -> dict:
        """OBS updates for the current masks, computed from the weights before zeroing."""
        params = dict(self.model.named_parameters())
        return obs_update(curvature, params, self.masks, absolute=self.settings.lam)

    def compensate(self, deltas: dict, before: dict) -> dict:
        """Add the OBS updates to the surviving weights; returns losses before and after."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, delta in deltas.items():
                keep = self.masks.get(name)
                delta = delta if keep is None else delta * keep.to(delta.dtype)
                params[name].add_(delta.to(params[name].dtype))
        apply_masks(self.model, self.masks)
        after = _eval(self.model, self.task, self.data)
        return {
            "loss_before_compensation": before["loss"],
            "loss_after_compensation": after["loss"],
        }

    def recalibrate(self, loss_before: float | None) -> dict:
        """Re-estimate BatchNorm statistics on training batches; returns the loss change."""
        if not self.use_recalibration:
            return {}
        before = loss_before if loss_before is not None else self.pruned["loss"]
        batches = self.data.train_batches(self.settings.batch_size, self.gen)
        recalibrate_bn(self.model, batches, forward=self.task.forward, max_batches=20)
        after = _eval(self.model, self.task, self.data)
        return {"loss_before_recalibration": before, "loss_after_recalibration": after["loss"]}

    def finetune(self, epochs: float, label: str, step: int, sparsity: float) -> None:
        """One mask-respecting fine-tuning phase, logging NTK at log-spaced iterations."""
        if epochs <= 0:
            return
        phase = self.settings.finetune_settings(epochs)
        batches = self.data.train_batches(self.settings.batch_size, self.gen)
        progress = self.progress
        tick = (lambda done, total: progress(label, done, total)) if progress else None
        on_step = None
        if self.ntk is not None:
            total = phase.total_steps(len(batches))
            when = set(log_spaced_iterations(total, self.settings.ntk_every)) - {0, total}

            def on_step(it: int) -> None:
                if it in when:
                    self.ntk(step, "finetune", it, sparsity, self.masks)

        model, train_masks = self.model, self.masks
        rank, world = rank_and_world()
        if world > 1:  # DistributedDataParallel over this rank's share of every batch
            model = DistributedDataParallel(self.model)
            train_masks = {f"module.{n}": m for n, m in self.masks.items()}
            batches = RankSlice(batches, rank, world)
        finetune(
            model, self.task, batches, phase, masks=train_masks, progress=tick, on_step=on_step
        )

    def record(self, step: int, after_prune: dict, seconds: float, ntk_value) -> None:
        """Append the metrics row of ``step`` (evaluated now, after its fine-tune)."""
        after = _eval(self.model, self.task, self.data)
        global_sparsity, per_layer = sparsity_of(self.masks)
        self.rows.append(
            {
                "step": step,
                "sparsity": global_sparsity,
                "per_layer": per_layer,
                "loss_after_prune": after_prune["loss"],
                "accuracy_after_prune": after_prune["accuracy"],
                "loss_after_finetune": after["loss"],
                "accuracy": after["accuracy"],
                "seconds": seconds,
                "ntk_alignment": ntk_value,
            }
        )
        if "cosine" in after:  # distillation: similarity to the dense outputs
            self.rows[-1].update(cosine_after_prune=after_prune["cosine"], cosine=after["cosine"])


def _start_run(model, data, settings, task, progress) -> tuple[_Run, object, list[float]]:
    device = resolve_device(settings.device)
    model.to(device)
    crit, sparsities, targets = validate(settings, model, data, task)
    torch.manual_seed(settings.seed)
    params = dict(model.named_parameters())
    masks = full_masks({n: params[n] for n in targets})
    run = _Run(
        model,
        task,
        data,
        settings,
        targets,
        masks,
        torch.Generator().manual_seed(settings.seed),
        progress,
    )
    run.use_recalibration = (
        has_batchnorm(model) if settings.recalibrate_bn is None else settings.recalibrate_bn
    )
    run.ntk = ntk_log_for(model, task, data, settings, targets)
    return run, crit, sparsities


def _ntk_now(run: _Run, step: int, phase: str, sparsity: float):
    return run.ntk(step, phase, None, sparsity, run.masks) if run.ntk is not None else None


def _prune_step(run: _Run, crit, score_batches, k: int, target: float, n_steps: int) -> None:
    """Score, mask, (compensate), fine-tune and record step ``k`` of ``n_steps``."""
    t0 = time.perf_counter()
    model, task, settings = run.model, run.task, run.settings
    masks = run.masks if settings.masked_scaling else None
    key = label_key(settings.seed, k)  # sampled labels keyed by (seed, step, example)
    scored = crit.evaluate(
        model, task, run.targets, score_batches, generator=key, masks=masks, cache=run.cache
    )
    run.estimators = scored.estimators or run.estimators
    if run.progress:
        run.progress("score", k, n_steps)
    run.masks = next_masks(scored.scores, run.masks, target, settings.scope)
    deltas = run.obs_deltas(scored.curvature) if settings.compensate else None
    apply_masks(model, run.masks)
    run.pruned = _eval(model, task, run.data)
    compensation = run.compensate(deltas, run.pruned) if deltas is not None else {}
    compensation.update(run.recalibrate(compensation.get("loss_after_compensation")))
    _ntk_now(run, k, "prune", target)
    run.finetune(settings.finetune_epochs, f"fine-tune step {k}", k, target)
    run.record(k, run.pruned, time.perf_counter() - t0, _ntk_now(run, k, "finetune", target))
    run.rows[-1].update(compensation)
    log.info("step %d/%d sparsity %.4f", k, n_steps, target)
    if run.progress:
        run.progress("steps", k, n_steps)


def run_pruning(
    model: nn.Module,
    data: DataBundle,
    settings: PruneSettings,
    task: Task | None = None,
    progress: Progress | None = None,
    state_dir=None,
    resume: bool = False,
    state_info: dict | None = None,
) -> PruneResult:
    """Prune ``model`` in place following ``settings``; return masks, metrics and report.

    Every setting is validated against the model and the data before any long work.
    state_dir: checkpoint every finished step there (weights, masks, RNG states, EKFAC
    basis, metrics so far), tagged with ``state_info`` (e.g. the recipe and its hash);
    resume: continue from the latest checkpoint, ending bit-identical (CPU) to an
    uninterrupted run.
    """
    start = time.perf_counter()
    cache, resuming = resume_plan(state_dir, resume)
    model.to(resolve_device(settings.device))
    task, data, teacher = prepare_task(model, data, settings, task, cache, resuming)
    run, crit, sparsities = _start_run(model, data, settings, task, progress)
    device = next(model.parameters()).device
    score_batches = score_batches_of(
        data, settings.score_examples, device, settings.score_batch_size
    )
    first = restore_state(run, state_dir, state_info) + 1 if resume else 1
    if first == 1:
        run.dense = _eval(model, task, data)
        run.record(0, run.dense, 0.0, _ntk_now(run, 0, "dense", 0.0))
    for k in range(first, len(sparsities) + 1):
        _prune_step(run, crit, score_batches, k, sparsities[k - 1], len(sparsities))
        if state_dir is not None:
            save_state(run, state_dir, k, state_info)
    run.finetune(settings.final_epochs, "final fine-tune", len(sparsities), settings.sparsity)
    final_ntk = _ntk_now(run, len(sparsities), "final", settings.sparsity)
    return _finish(run, crit, teacher, final_ntk, start)


def _finish(run: _Run, crit, teacher: dict | None, final_ntk, start: float) -> PruneResult:
    """The result of a finished run: final metrics, report (``seconds`` since ``start``,
    the final evaluation included), NTK records and probe."""
    model, task, settings = run.model, run.task, run.settings
    metrics = {"dense": run.dense, "pruned": run.pruned, "finetuned": _eval(model, task, run.data)}
    report = build_report(
        settings,
        crit,
        task,
        model,
        run.targets,
        run.masks,
        run.rows,
        run.estimators,
        metrics,
        time.perf_counter() - start,
    )
    report["ntk"] = {"enabled": run.ntk is not None, "final_alignment": final_ntk}
    report["bn_recalibration"] = run.use_recalibration
    report["task"] = task_report(task, settings)
    ntk_records = run.ntk.records if run.ntk is not None else []
    probe = run.ntk.probe if run.ntk is not None else None
    return PruneResult(model, run.masks, report, run.rows, ntk_records, probe, teacher)
