"""Structured ('units') pruning: the plan, one pruning step, the shrunk model, the report.

``--structure units --sparsity s``: s is the fraction of UNITS removed, counted over every
unit group of the model (``prune.groups``; found by ``prune.trace.find_unit_groups``).
Scope 'global' ranks all units together by their group score (``criteria.groups``; loss
units for lm, qm, obd, obs), removing exactly round(s * total) units, never the last unit
of a group; scope 'layer' removes round(s * size) units of every group. Each step removes
more units (monotone), the param-level keep-masks of every member (rows, biases,
BatchNorm entries, consumers' columns: ``unit_param_masks``) replace ``run.masks`` and are
re-applied after every optimizer step by the fine-tuning; which units are kept is read back
from the masks (``UnitPlan.keep_of``), so a resumed run needs nothing else.

Curvature: for qm/obd/obs the member weights of Linear/Conv layers are fitted by the
criterion's estimator (KFAC/EKFAC: the factored group quadratic, biases in the block), all
other members (BatchNorm, recurrent weights, grouped convs, unfactored biases) by the
diagonal Fisher of the same labels. 'obs' also compensates: the consumers of removed
units get the structured OBS update of their remaining columns (``obs_column_update``).
Magnitude scores are divided by their group's mean under scope 'global' (raw L2 norms
would rank by fan-in); see ``criteria.groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.criteria.curvature import fit_curvature, output_classes
from prunekit.criteria.fisher import check_labels, mean_gradient
from prunekit.criteria.groups import (
    GROUP_CRITERIA,
    factored_layers,
    group_scores,
    obs_column_update,
    unit_index,
)
from prunekit.criteria.kfac import split_targets
from prunekit.data import DataBundle
from prunekit.errors import ModelError, SettingError, choice_error
from prunekit.prune.groups import UnitGroup, unit_param_masks
from prunekit.prune.masks import apply_masks
from prunekit.prune.targets import find_targets
from prunekit.types import Masks, Target, Task, batch_inputs


@dataclass(frozen=True)
class UnitPlan:
    """The unit groups of a model and what scoring them needs.

    groups: the unit groups (``prune.groups.UnitGroup``); shapes: every parameter's shape
    (name -> shape); targets: the member parameters the curvature is fitted on (Linear/Conv
    weights factored, the rest diagonal; biases of factored layers ride in their block).
    """

    groups: tuple[UnitGroup, ...]
    shapes: dict[str, tuple[int, ...]]
    targets: dict[str, Target]

    @property
    def total(self) -> int:
        """Units over all groups."""
        return sum(g.size for g in self.groups)

    @property
    def members(self) -> list[str]:
        """Every member parameter name, first-seen order."""
        return list(dict.fromkeys(m.param for g in self.groups for m in g.members))

    def masks_for(self, keep: dict[str, Tensor]) -> Masks:
        """Param-level keep-masks (True = keep) of every member for the kept units."""
        return unit_param_masks(list(self.groups), keep, self.shapes)

    def full_masks(self) -> Masks:
        """All-True masks of every member parameter: a units run's initial ``run.masks``."""
        return self.masks_for({g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups})

    def keep_of(self, masks: Masks) -> dict[str, Tensor]:
        """Kept units per group (bool (size,), True = kept) read off param-level masks: a
        unit is kept while every producing member still has an entry of it."""
        keep = {}
        for g in self.groups:
            kept = torch.ones(g.size, dtype=torch.bool)
            for m in g.members:
                if m.role != "out" or m.param not in masks:
                    continue
                idx = unit_index(m, g.size)
                mask = masks[m.param].cpu().movedim(m.dim, 0)
                kept &= mask[idx.reshape(-1)].reshape(g.size, -1).any(1)
            keep[g.name] = kept
        return keep


def _curvature_targets(model: nn.Module, groups, targets: dict[str, Target]) -> dict:
    """Member parameters as curvature targets: the run's (or default) targets keep their
    kind, grouped-conv weights and every other member are 'other' (diagonal Fisher), and
    biases of factorable layers are dropped (their block's last column covers them)."""
    modules = dict(model.named_modules())
    known = {**find_targets(model), **targets}
    out: dict[str, Target] = {}
    for g in groups:
        for m in g.members:
            if m.param in out:
                continue
            module = m.param.rpartition(".")[0]
            t = known.get(m.param) or Target(m.param, module, (), "other")
            shape = tuple(dict(model.named_parameters())[m.param].shape)
            kind = "other" if getattr(modules.get(module), "groups", 1) != 1 else t.kind
            out[m.param] = Target(m.param, t.module, shape, kind)
    factored, _ = split_targets(model, out)
    biases = {f"{ly.module}.bias" if ly.module else "bias" for ly in factored.values()}
    return {n: t for n, t in out.items() if n not in biases}


def check_unit_sparsity(groups, sparsity: float, scope: str) -> None:
    """SettingError (one line) when ``sparsity`` would empty a unit group."""
    if scope == "layer":
        bound = min((g.size - 0.5) / g.size for g in groups)
        for g in groups:
            if round(sparsity * g.size) >= g.size:
                raise SettingError(
                    f"--sparsity {sparsity} removes all {g.size} units of layer {g.name!r} "
                    f"(scope 'layer'); use a sparsity below {bound:.4f}"
                )
        return
    total = sum(g.size for g in groups)
    most = total - len(groups)  # every group keeps one unit
    if round(sparsity * total) > most:
        raise SettingError(
            f"--sparsity {sparsity} removes {round(sparsity * total)} of {total} units, but "
            f"every one of the {len(groups)} unit groups keeps one; use at most {most / total:.4f}"
        )


def plan_units(
    model: nn.Module,
    task: Task,
    data: DataBundle,
    targets: dict[str, Target],
    settings,
    groups: list[UnitGroup] | None = None,
) -> UnitPlan:
    """The unit groups of ``model`` (``prune.trace.find_unit_groups`` on two training
    examples, unless ``groups`` is given) checked against the settings: SettingError (one
    line) for a criterion without a group score, a sparsity that empties a group, or a
    model without units; ModelError from the tracer for patterns it cannot prove."""
    if settings.criterion_name not in GROUP_CRITERIA:
        raise choice_error("criterion for --structure units", settings.criterion, GROUP_CRITERIA)
    if groups is None:
        from prunekit.prune.trace import find_unit_groups

        example = batch_inputs(data.first_train(2)[0])
        groups = find_unit_groups(model, example, targets)
    if not groups:
        raise SettingError(
            "--structure units: the model has no prunable units (hidden neurons, channels, "
            "hidden units, heads or FFN units between two layers)"
        )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for g in groups:
        g.check(shapes)
    check_unit_sparsity(groups, settings.sparsity, settings.scope)
    return UnitPlan(tuple(groups), shapes, _curvature_targets(model, groups, targets))


def score_units(
    model: nn.Module, task: Task, plan: UnitPlan, crit, batches, key, *, masks=None, cache=None,
    scope: str = "global",
) -> tuple[dict[str, Tensor], object | None]:  # fmt: skip
    """(scores per group (size,) float64, higher = keep; the fitted curvature or None).

    crit: the run's criterion (its class name in ``GROUP_CRITERIA``, and its fisher,
    labels, samples, lam, refit_basis_every, damping); key: the sampled labels' key; masks:
    EKFAC's masked scaling (or None); cache: the run's cache (EKFAC keeps its basis there).
    """
    name = type(crit).__name__.lower()
    params = dict(model.named_parameters())
    groups = list(plan.groups)
    if name == "magnitude":
        return group_scores(name, groups, params, normalize=scope == "global"), None
    batches = list(batches)
    grads = mean_gradient(model, task, plan.members, batches) if name in ("lm", "qm") else None
    if name == "lm":
        return group_scores(name, groups, params, grads=grads), None
    labels = crit.labels_for(task, output_classes(model, task, batches))
    check_labels(labels, task, crit.samples)
    fisher = crit.fisher
    targets = plan.targets if fisher != "diag" else _all_members(model, plan)
    curv = fit_curvature(
        fisher, model, task, targets, batches, labels=labels, samples=crit.samples,
        generator=key, masks=masks, cache=cache, refit_basis_every=crit.refit_basis_every,
        refit_basis_below=crit.refit_basis_below,
    )  # fmt: skip
    factored = factored_layers(curv)
    fallback = curv if fisher == "diag" else curv.fallback
    diag = fallback.diagonal() if fallback is not None else {}
    if fisher != "diag":  # grouped convs are factored by KFAC but not by the group form
        grouped = {t for t in getattr(curv, "layers", {}) if t not in factored}
        diag.update({t: v for t, v in curv.diagonal().items() if t in grouped})
    scores = group_scores(
        name, groups, params, grads=grads, factored=factored, diag=diag, lam=crit.lam,
        obs_damping=getattr(crit, "damping", 1e-3),
    )  # fmt: skip
    return scores, curv


def _all_members(model: nn.Module, plan: UnitPlan) -> dict[str, Target]:
    """Every member parameter (biases included) as a diagonal-Fisher target."""
    params = dict(model.named_parameters())
    return {
        n: Target(n, n.rpartition(".")[0], tuple(params[n].shape), "other") for n in plan.members
    }


def select_units(
    plan: UnitPlan, scores: dict[str, Tensor], keep: dict[str, Tensor], sparsity: float,
    scope: str,
) -> dict[str, Tensor]:  # fmt: skip
    """Kept units per group after removing the lowest-scored kept units (monotone: removed
    units stay removed). global: exactly round(sparsity * total) removed in all, never the
    last unit of a group; layer: round(sparsity * size) per group. Ties: lower index first."""
    for n, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise ModelError(f"unit scores of {n!r} are not finite (NaN/inf in weights or data)")
    new = {n: k.clone() for n, k in keep.items()}
    if scope == "layer":
        for g in plan.groups:
            more = round(sparsity * g.size) - int((~new[g.name]).sum())
            if more > 0:
                order = _order(scores[g.name].cpu(), new[g.name])
                new[g.name][order[:more]] = False
        return new
    more = round(sparsity * plan.total) - sum(int((~k).sum()) for k in new.values())
    if more <= 0:
        return new
    cand_scores, cand = [], []
    for g in plan.groups:
        order = _order(scores[g.name].cpu(), new[g.name])[:-1]  # the best unit stays
        cand_scores.append(scores[g.name].cpu()[order])
        cand += [(g.name, int(j)) for j in order]
    flat = torch.cat(cand_scores)
    chosen = torch.sort(flat, stable=True).indices[:more]
    for i in chosen.tolist():
        name, j = cand[i]
        new[name][j] = False
    return new


def _order(score: Tensor, kept: Tensor) -> Tensor:
    """Indices of the kept units, lowest score first (stable)."""
    idx = torch.nonzero(kept).flatten()
    return idx[torch.sort(score[idx], stable=True).indices]


def _compensate(model, plan: UnitPlan, curv, before, after, damping: float) -> list[str]:
    """Add the structured OBS update to every factored consumer of newly removed units;
    returns the consumer weights updated."""
    factored = factored_layers(curv) if curv is not None else {}
    params = dict(model.named_parameters())
    done = []
    with torch.no_grad():
        for g in plan.groups:
            gone = torch.nonzero(before[g.name] & ~after[g.name]).flatten()
            for m in g.members:
                f = factored.get(m.param)
                if f is None or m.role != "in" or not len(gone):
                    continue
                chans = torch.cat([m.index(int(j)) for j in gone])
                cols = (chans[:, None] * f.kernel + torch.arange(f.kernel)).reshape(-1)
                for n, delta in obs_column_update(f, params, cols, damping).items():
                    params[n].add_(delta)
                done.append(m.param)
    return done


def unit_step(run, crit, score_batches, key, target: float) -> dict:
    """One units pruning step on the loop's ``_Run`` (``run.units`` holds the ``UnitPlan``):
    score every unit, remove the lowest until ``target`` of all units are gone (monotone),
    update ``run.masks`` with the members' param-level masks (entries of other parameters,
    e.g. all-True masks of targets in no group, stay) and zero the entries ('obs': the
    consumers' remaining columns compensate first). Returns metrics-row entries: 'sparsity'
    (fraction of units removed), 'weight_sparsity' (of all masked entries), 'units_kept'
    per group (and 'obs_compensated': the consumer weights updated)."""
    plan: UnitPlan = run.units
    settings = run.settings
    before = plan.keep_of(run.masks)
    masks = run.masks if getattr(settings, "masked_scaling", False) else None
    scores, curv = score_units(
        run.model, run.task, plan, crit, score_batches, key, masks=masks, cache=run.cache,
        scope=settings.scope,
    )  # fmt: skip
    if curv is not None and hasattr(curv, "estimators"):
        run.estimators = curv.estimators()
    keep = select_units(plan, scores, before, target, settings.scope)
    compensated = []
    if type(crit).__name__.lower() == "obs":
        damping = getattr(crit, "damping", 1e-3)
        compensated = _compensate(run.model, plan, curv, before, keep, damping)
    # entries of targets outside every group (all True) stay, so report and resume see them
    run.masks = {**run.masks, **plan.masks_for(keep)}
    apply_masks(run.model, run.masks)
    return step_entries(plan, run.masks, keep, compensated)


def step_entries(plan: UnitPlan, masks: Masks, keep, compensated=()) -> dict:
    """Metrics-row entries of a units step (see ``unit_step``); 'weight_sparsity' is over
    every entry of ``masks``."""
    removed = sum(int((~k).sum()) for k in keep.values())
    entries = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    out = {
        "sparsity": removed / plan.total,
        "weight_sparsity": zeros / entries if entries else 0.0,
        "units_kept": {n: int(k.sum()) for n, k in keep.items()},
    }
    if compensated:
        out["obs_compensated"] = list(compensated)
    return out


def shrink_result(model: nn.Module, plan: UnitPlan, masks: Masks) -> nn.Module:
    """A NEW, physically smaller model (``prune.shrink.shrink_model``) without the removed
    units, equal in output to ``model`` with its masks applied."""
    from prunekit.prune.shrink import shrink_model

    return shrink_model(model, list(plan.groups), plan.keep_of(masks))


def _kept_params(plan: UnitPlan, masks: Masks) -> int:
    """Parameters after shrinking: per member, the product over dims of the slices that
    keep an entry; non-members unchanged."""
    total = 0
    for name, shape in plan.shapes.items():
        mask = masks.get(name)
        if mask is None:
            total += math.prod(shape)
            continue
        dims = [
            int(mask.movedim(d, 0).reshape(shape[d], -1).any(1).sum()) for d in range(mask.dim())
        ]
        total += math.prod(dims)
    return total


def units_report(plan: UnitPlan, masks: Masks, shrunk: nn.Module | None = None) -> dict:
    """report.json 'units': units before/after per group and in all, parameters before/after
    the shrink (counts; after = ``shrunk``'s parameters when given, else counted from the
    masks: a stacked LSTM's padding units are then not counted), the fraction removed."""
    keep = plan.keep_of(masks)
    groups = {
        g.name: {"kind": g.kind, "before": g.size, "after": int(keep[g.name].sum())}
        for g in plan.groups
    }
    after = sum(v["after"] for v in groups.values())
    return {
        "units_before": plan.total,
        "units_after": after,
        "units_removed": 1.0 - after / plan.total,
        "params_before": sum(math.prod(s) for s in plan.shapes.values()),
        "params_after": (
            sum(p.numel() for p in shrunk.parameters())
            if shrunk is not None
            else _kept_params(plan, masks)
        ),
        "groups": groups,
    }
