"""The pruning loop of design.md section 4: what a reader opens to see the algorithm.

    task, data  <- prepare_task (distillation: the dense outputs become the targets)
    validate every setting against model and data        (preflight.validate)
    for target sparsity s_k in schedule(final, steps, kind):
        scores = criterion.evaluate(model, task, targets, score batches)
        masks  = next_masks(scores, masks, s_k, scope)      # exact count, monotone
        apply masks; (OBS compensation; BatchNorm recalibration)
        fine-tune, masks re-applied after every optimizer step (lr 'auto': probed once,
            at the first phase); the phase's best weights on validation are kept
        metrics row (+ NTK alignment); checkpoint the step (resume)
    final fine-tune (same rule); report

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
from prunekit.criteria.curvature import output_classes
from prunekit.data import DataBundle
from prunekit.distill import prepare_task
from prunekit.finetune import (
    AUTO,
    LR_CANDIDATES,
    PROBE_STEPS,
    PROBE_TOLERANCE,
    PhaseGuard,
    evaluate,
    finetune,
    lr_setting,
    probe_lr,
)
from prunekit.finetune.bn import has_batchnorm, recalibrate_bn
from prunekit.ntklog import NTK_DEFAULT_HINT, NtkLog, ntk_log_for
from prunekit.obsupdate import held_out_batches, step_deltas
from prunekit.preflight import validate
from prunekit.prune.masks import apply_masks, full_masks, next_masks, sparsity_of
from prunekit.ranks import RankSlice, label_key, rank_and_world, score_batches_of
from prunekit.report import build_report, data_report, finetune_report, task_report
from prunekit.resume import restore_state, resume_plan, save_state
from prunekit.settings import (
    DAMPED_UPDATES,
    Progress,
    PruneResult,
    PruneSettings,
    resolve_device,
    resolved_labels,
)
from prunekit.types import Masks, Target, Task, batch_to
from prunekit.units import plan_units, shrink_result, unit_step, units_report

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
    lr: float | None = None
    lr_probe: dict | None = None
    held_out: list | None = None
    held_out_source: str | None = None
    units: object | None = None  # the UnitPlan of --structure units (prunekit/units.py)

    def compensate(self, deltas: dict, before: dict | None) -> dict:
        """Add the OBS updates to the surviving weights; returns losses before (``before``:
        the evaluation of the masked weights without update, which becomes ``pruned``) and
        after, or {} when ``before`` is None (a shot that is not the step's last)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, delta in deltas.items():
                keep = self.masks.get(name)
                delta = delta if keep is None else delta * keep.to(delta.dtype)
                params[name].add_(delta.to(params[name].dtype))
        apply_masks(self.model, self.masks)
        if before is None:
            return {}
        self.pruned = before
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

    def train(self, phase, progress=None, on_step=None, generator=None) -> None:
        """Run one fine-tuning ``phase`` on the model (DistributedDataParallel over this
        rank's share of every batch under torchrun); batches shuffled by ``generator``
        (default: the run's)."""
        batches = self.data.train_batches(self.settings.batch_size, generator or self.gen)
        model, train_masks = self.model, self.masks
        rank, world = rank_and_world()
        if world > 1:
            model = DistributedDataParallel(self.model)
            train_masks = {f"module.{n}": m for n, m in self.masks.items()}
            batches = RankSlice(batches, rank, world)
        finetune(
            model, self.task, batches, phase, masks=train_masks, progress=progress, on_step=on_step
        )

    def phase_lr(self, epochs: float, step: int, before: dict) -> float:
        """The fine-tuning rate: the setting, or for 'auto' the probe's choice (probed at the
        first phase that runs, then reused; a resumed run reads it back from its rows)."""
        if self.lr is not None:
            return self.lr
        chosen = lr_setting(self.settings.lr)
        if chosen != AUTO:
            self.lr = chosen
            return chosen
        for row in self.rows:  # resumed: the probe ran before the checkpoint
            self.lr = row.get("finetune_lr", self.lr)
            self.lr_probe = row.get("lr_probe", self.lr_probe)
        if self.lr is None:
            self._probe(epochs, step, before)
        return self.lr

    def _probe(self, epochs: float, step: int, before: dict) -> None:
        """Probe the candidate rates from the current weights (none of it is kept)."""
        phase = self.settings.finetune_settings(epochs)
        total = phase.total_steps(len(self.data.train_batches(self.settings.batch_size, self.gen)))
        steps = max(1, min(PROBE_STEPS, total))
        seed = (self.settings.seed + 1) % 2**63  # the same batches for every candidate
        progress = self.progress
        tick = (lambda done, n: progress("lr probe", done, n)) if progress else None
        self.lr, table = probe_lr(
            self.model,
            lambda p, tk: self.train(p, tk, generator=torch.Generator().manual_seed(seed)),
            lambda: _eval(self.model, self.task, self.data),
            phase,
            steps=steps,
            progress=tick,
        )
        self.lr_probe = {"step": step, "steps": steps, "loss_before": before["loss"]}
        self.lr_probe.update(tolerance=PROBE_TOLERANCE, table=table)
        log.info("lr auto: probed %s at step %d, chosen %g", LR_CANDIDATES, step, self.lr)

    def finetune(
        self, epochs: float, label: str, step: int, sparsity: float, before: dict | None = None
    ) -> dict | None:
        """One mask-respecting fine-tuning phase, logging NTK at log-spaced iterations, that
        hands back its best weights on validation (never worse than ``before``, the
        evaluation of the current weights; None = evaluate now). Returns the phase record
        (``PhaseGuard.finish`` plus 'lr'), or None when no phase runs (epochs <= 0)."""
        if epochs <= 0:
            return None
        before = before if before is not None else _eval(self.model, self.task, self.data)
        lr = self.phase_lr(epochs, step, before)
        phase = self.settings.finetune_settings(epochs, lr)
        total = phase.total_steps(len(self.data.train_batches(self.settings.batch_size, self.gen)))
        validate = lambda: _eval(self.model, self.task, self.data)  # noqa: E731
        guard = PhaseGuard(self.model, validate, before, total, self.settings.finetune_checkpoints)
        when = set()
        if self.ntk is not None:
            when = set(log_spaced_iterations(total, self.settings.ntk_every)) - {0, total}

        def on_step(it: int) -> None:
            if it in when:
                self.ntk(step, "finetune", it, sparsity, self.masks)
            guard.step(it)

        progress = self.progress
        tick = (lambda done, n: progress(label, done, n)) if progress else None
        self.train(phase, tick, on_step)
        outcome = guard.finish()
        if outcome["kept"] != "end":
            log.info("%s: validation loss rose; kept the weights of iteration %d of %d",
                     label, outcome["kept_iteration"], outcome["iterations"])  # fmt: skip
        return {"lr": lr, **outcome}

    def record(
        self, step: int, after_prune: dict, seconds: float, ntk_value, phase: dict | None = None
    ) -> None:
        """Append the metrics row of ``step``: after its fine-tune, from the ``phase`` record
        of ``finetune`` (the kept weights' evaluation), or evaluated now (no phase)."""
        after = phase["metrics"] if phase else _eval(self.model, self.task, self.data)
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
        if phase:
            self.rows[-1].update(phase_entries(phase))
            if self.lr_probe is not None and self.lr_probe["step"] == step:
                self.rows[-1]["lr_probe"] = self.lr_probe  # read back on resume


def phase_entries(phase: dict) -> dict:
    """Metrics-row entries of a fine-tuning phase record: its rate, the loss it started
    from, and which weights it handed back ('end', 'checkpoint' or 'start' = rolled back)."""
    return {
        "finetune_lr": phase["lr"],
        "loss_before_finetune": phase["loss_before"],
        "finetune_kept": phase["kept"],
        "finetune_kept_iteration": phase["kept_iteration"],
        "finetune_iterations": phase["iterations"],
    }


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
    if settings.structure == "units":
        run.units = plan_units(model, task, data, targets, settings)
        run.masks = {**run.masks, **run.units.full_masks()}  # biases, BatchNorm: resume sees them
    if settings.update_mode in DAMPED_UPDATES:
        device = next(model.parameters()).device
        run.held_out, run.held_out_source = held_out_batches(data, settings.score_examples, device)
    return run, crit, sparsities


def _ntk_now(run: _Run, step: int, phase: str, sparsity: float):
    return run.ntk(step, phase, None, sparsity, run.masks) if run.ntk is not None else None


def _shot_key(seed: int, step: int, shot: int, shots: int):
    """The sampled-label key of one shot: (seed, step) for one shot per step (as before
    shots existed), else a step index no other shot of the run uses."""
    return label_key(seed, step if shots == 1 else step * 1024 + shot)


def _remove(run: _Run, crit, score_batches, k: int, targets: list[float], last_eval: bool):
    """Score and mask once per shot, removing weights up to each of ``targets`` in turn,
    with the OBS ``update`` applied after each shot; returns the compensation record of
    the last shot ({} without update). The curvature is re-estimated before every shot."""
    settings, model = run.settings, run.model
    masks_for_scaling = run.masks if settings.masked_scaling else None
    record: dict = {}
    for j, target in enumerate(targets, start=1):
        key = _shot_key(settings.seed, k, j, len(targets))
        scored = crit.evaluate(
            model, run.task, run.targets, score_batches, generator=key,
            masks=masks_for_scaling, cache=run.cache,
        )  # fmt: skip
        run.estimators = scored.estimators or run.estimators
        proposed = next_masks(scored.scores, run.masks, target, settings.scope)
        if getattr(crit, "reconstructs", False):
            record.update(_reconstruct(run, crit, proposed))
            continue
        run.masks = proposed
        deltas = None
        if settings.update_mode != "none":
            deltas, damping = step_deltas(run, scored.curvature, run.held_out)
            if damping is not None:
                record["update_damping"] = damping
        apply_masks(model, run.masks)
        if deltas is None:
            continue
        last = j == len(targets)
        before = _eval(model, run.task, run.data) if last and last_eval else None
        record.update(run.compensate(deltas, before))
    return record


def _reconstruct(run: _Run, crit, proposed) -> dict:
    """Layer-wise reconstruction to the counts of ``proposed`` (every rank uses the same
    first ``score_examples`` training examples, so every rank gets the same weights)."""
    settings = run.settings
    device = next(run.model.parameters()).device
    calib = [batch_to(b, device) for b in run.data.first_train(
        settings.score_examples, settings.score_batch_size)]  # fmt: skip
    result = crit.reconstruct(run.model, run.task, run.targets, calib, run.masks, proposed)
    run.masks = {n: result.masks[n] for n in run.masks}
    apply_masks(run.model, run.masks)
    out = {"reconstruction_error": result.reconstruction}
    if result.fallback:
        out["reconstruction_fallback"] = list(result.fallback)
    return out


def _shot_targets(start: float, target: float, shots: int) -> list[float]:
    """Sparsities after each shot of a step from ``start`` to ``target``: equal slices."""
    return [start + (target - start) * j / shots for j in range(1, shots + 1)]


def _prune_step(run: _Run, crit, score_batches, k: int, target: float, n_steps: int) -> None:
    """Score, mask, (update), fine-tune and record step ``k`` of ``n_steps``."""
    t0 = time.perf_counter()
    model, task, settings = run.model, run.task, run.settings
    start = sparsity_of(run.masks)[0] if settings.shot_count > 1 else target
    shots = _shot_targets(start, target, settings.shot_count)
    units = {}
    if run.units is not None:  # whole units: scored by group, masks over every member
        units = unit_step(run, crit, score_batches, label_key(settings.seed, k), target)
        compensation = {}
    else:
        compensation = _remove(run, crit, score_batches, k, shots, last_eval=True)
    if run.progress:
        run.progress("score", k, n_steps)
    compensated = "loss_after_compensation" in compensation
    run.pruned = run.pruned if compensated else _eval(model, task, run.data)
    recalibrated = run.recalibrate(compensation.get("loss_after_compensation"))
    compensation.update(recalibrated)
    _ntk_now(run, k, "prune", target)
    before = None if compensated or recalibrated else run.pruned  # changed: evaluate again
    phase = run.finetune(settings.finetune_epochs, f"fine-tune step {k}", k, target, before)
    seconds = time.perf_counter() - t0
    run.record(k, run.pruned, seconds, _ntk_now(run, k, "finetune", target), phase)
    run.rows[-1].update(compensation)
    run.rows[-1].update(units)  # units: 'sparsity' is the fraction of units removed
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
    final = run.finetune(
        settings.final_epochs, "final fine-tune", len(sparsities), settings.sparsity
    )
    final_ntk = _ntk_now(run, len(sparsities), "final", settings.sparsity)
    return _finish(run, crit, teacher, final_ntk, start, final)


def _finish(run: _Run, crit, teacher, final_ntk, start: float, final: dict | None) -> PruneResult:
    """The result of a finished run: final metrics, report (``seconds`` since ``start``,
    the final evaluation included), NTK records and probe. final: the final fine-tune's
    phase record (None when it did not run)."""
    model, task, settings = run.model, run.task, run.settings
    tuned = final["metrics"] if final else _eval(model, task, run.data)
    metrics = {"dense": run.dense, "pruned": run.pruned, "finetuned": tuned}
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
    if crit.uses_curvature:  # the default depends on the class count (exact up to 32)
        classes = output_classes(model, task, run.data.first_train(2))
        report["fisher_labels"] = resolved_labels(crit, task, classes)
    report["finetune"] = finetune_report(settings, run.lr, run.lr_probe, run.rows, final)
    report["ntk"] = {"enabled": run.ntk is not None, "final_alignment": final_ntk}
    if run.ntk is None:
        report["ntk"]["note"] = NTK_DEFAULT_HINT
    report["bn_recalibration"] = run.use_recalibration
    report["update"] = {
        "mode": settings.update_mode,
        "requested": settings.update,
        "shots": settings.shot_count,
    }
    shrunk = None
    if run.units is not None:
        shrunk = shrink_result(model, run.units, run.masks)
        report["units"] = units_report(run.units, run.masks, shrunk)
    if run.held_out_source:  # the joint update's per-layer damping: rows' update_damping
        report["update"]["damping_chosen_on"] = run.held_out_source
    report["task"] = task_report(task, settings)
    report["data"] = data_report(run.data)
    ntk_records = run.ntk.records if run.ntk is not None else []
    probe = run.ntk.probe if run.ntk is not None else None
    result = PruneResult(model, run.masks, report, run.rows, ntk_records, probe, teacher)
    result.shrunk = shrunk
    return result
