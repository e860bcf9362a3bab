"""Curvature estimators: values with one operation the pruner needs, ``diagonal()``.

``ESTIMATORS`` maps a name (CLI ``--fisher``) to a fit function
``fit(model, task, targets, batches, *, labels, samples, generator) -> curvature``;
the returned value (``Diag``, ``KFAC``, ``EKFAC``) has ``diagonal() -> dict[str, Tensor]``
(parameter space, shaped like each target), ``inverse_diagonal(damping, absolute)`` (for
OBS) and ``estimators() -> dict[str, str]`` (which estimator each target got: KFAC/EKFAC
fall back to 'diag' for targets they cannot factor).

Default labels (``default_labels``, measured in BENCHMARKS.md "Fisher labels"): 'exact'
for every estimator on a classifier with at most ``EXACT_MAX_CLASSES`` (32) classes -- C
backward passes per batch, but at the same time budget EKFAC with exact labels was closer
to the exact diagonal Fisher and pruned better one-shot than with 1, 4 or 16 sampled labels
per example, and sampled EKFAC fell below the exact diagonal (issue 16). 'sampled' (one
label per example: ``DEFAULT_SAMPLES``) for more classes and for regression/distillation,
which has no 'exact': at the same budget more examples beat more labels per example there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from prunekit.criteria.capture import scoring_mode
from prunekit.criteria.diag import Diag, fit_diag
from prunekit.criteria.ekfac import EKFAC, EKFACBasis, fit_ekfac, refit_scaling
from prunekit.criteria.kfac import KFAC, fit_kfac, reiterable, split_targets
from prunekit.errors import SettingError, choice_error, int_setting
from prunekit.types import Batch, LabelKey, Masks, Target, Task

log = logging.getLogger(__name__)

ESTIMATORS: dict[str, Callable[..., object]] = {
    "diag": fit_diag,
    "kfac": fit_kfac,
    "ekfac": fit_ekfac,
}
DEFAULT_ESTIMATOR = "ekfac"

__all__ = ["EKFAC", "EKFACBasis", "KFAC", "Diag", "ESTIMATORS", "fit_curvature"]


# Most classes for which 'exact' labels are the default (each class is one backward pass).
EXACT_MAX_CLASSES = 32
# Sampled labels per example when 'sampled' is the default (bench: k = 1 beats 4 and 16 at
# the same time budget, since more examples help more than more labels per example).
DEFAULT_SAMPLES = 1


def default_labels(estimator: str, task: Task | None = None, classes: int | None = None) -> str:
    """The labels an estimator uses when none are given (see the module docstring).

    'exact' on a classifier (``task`` None or categorical) with ``classes`` <= 32, or with
    ``classes`` None (unknown: pass it, e.g. ``output_classes``, where a model may have
    many); 'sampled' for more classes and for a task without categorical output;
    'empirical' for a task that can neither enumerate nor sample labels. The same for every
    estimator (``estimator`` is kept for callers and future estimators).
    """
    del estimator  # the bench found one rule for diag, kfac and ekfac
    if task is not None and not task.categorical and not task.can_sample:
        return "empirical"  # a user task that cannot draw from its predictive distribution
    classifier = task is None or task.categorical
    few = classes is None or int(classes) <= EXACT_MAX_CLASSES
    return "exact" if classifier and few else "sampled"


def output_classes(model: nn.Module, task: Task, batches: Iterable[Batch]) -> int | None:
    """Number of classes of a categorical ``task`` (the last output dim), else None.

    Runs the model on the first batch (no gradient, scoring mode); None for an empty
    iterable or a task without categorical output. Pass a re-iterable ``batches``.
    """
    if not task.categorical:
        return None
    for batch in batches:
        with scoring_mode(model), torch.no_grad():
            return int(task.forward(model, batch).shape[-1])
    return None


def check_refit_every(value: int) -> int:
    """``refit_basis_every`` as an int >= 0 (0 = keep the first basis); SettingError if not."""
    return int_setting(value, "refit_basis_every", 0, " (0 = never refit the basis)")


def check_refit_below(value: float) -> float:
    """``refit_basis_below`` as a number in [0, 1) (0 = off); SettingError if not."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    if not ok:
        raise SettingError(
            f"refit_basis_below {value!r} must be a number in [0, 1): the kept fraction of "
            "target weights, relative to the last basis fit, below which the EKFAC "
            "eigenbasis is fitted again (0 = off)"
        )
    return float(value)


def kept_fraction(model: nn.Module, targets: dict[str, Target]) -> float:
    """Fraction of the target weights that are nonzero (pruned weights are zeros)."""
    params = dict(model.named_parameters())
    kept = sum(int(params[t].count_nonzero()) for t in targets)
    return kept / max(1, sum(params[t].numel() for t in targets))


def _covers(basis: EKFACBasis, model: nn.Module, targets: dict[str, Target]) -> bool:
    layers, _ = split_targets(model, targets)
    return all(basis.layers.get(t) == ly for t, ly in layers.items())


def _fit_ekfac_cached(
    model, task, targets, batches, cache: dict, every: int, below: float = 0.0, **kwargs
):
    """EKFAC reusing ``cache['ekfac_basis']`` unless this step is due for a new basis.

    Steps are counted in ``cache['ekfac_step']``: the basis is fitted at step 0, when
    ``every`` > 0 at every step that is a multiple of ``every``, and when ``below`` > 0
    once the kept fraction of target weights is at most ``below`` times its value at the
    last fit (``cache['ekfac_kept']``); otherwise only S is refit.
    """
    step = int(cache.get("ekfac_step", 0))
    basis = cache.get("ekfac_basis")
    kept = kept_fraction(model, targets)
    thinned = below > 0 and kept <= below * float(cache.get("ekfac_kept", 1.0))
    due = basis is None or (every > 0 and step % every == 0) or thinned
    if due or not _covers(basis, model, targets):
        curv = fit_ekfac(model, task, targets, batches, **kwargs)
        cache["ekfac_kept"] = kept
        log.info("step %d: fitted a new EKFAC eigenbasis (%.3g of the weights kept)", step, kept)
    else:
        curv = refit_scaling(basis, model, task, targets, batches, **kwargs)
        log.info("step %d: kept the EKFAC eigenbasis, refit the scaling", step)
    cache["ekfac_basis"] = curv.basis
    cache["ekfac_step"] = step + 1
    return curv


def fit_curvature(
    estimator: str,
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    *,
    labels: str | None = None,
    samples: int = 1,
    generator: torch.Generator | LabelKey | None = None,
    masks: Masks | None = None,
    cache: dict | None = None,
    refit_basis_every: int = 0,
    refit_basis_below: float = 0.0,
):
    """Fit the registered estimator ``estimator``; SettingError if unknown.

    labels None = ``default_labels(estimator, task, classes)``, with the classes read off
    the model's outputs on the first batch (``output_classes``). masks (True = keep) make pruned
    weights contribute nothing to EKFAC's scaling (other estimators ignore them: a pruned
    weight's own diagonal entry does not change anything else). cache: a dict the caller
    keeps across pruning steps; with 'ekfac' it holds the eigenbasis, refit every
    ``refit_basis_every`` steps (0 = only at the first call) and whenever the kept fraction
    of target weights has fallen to ``refit_basis_below`` times its value at the last fit
    (0 = off), S being refit every call.
    generator: sampled labels' key (``types.LabelKey``: seed, step, example numbering), or
    a torch.Generator whose one draw seeds a key; None = seed 0.
    """
    if estimator not in ESTIMATORS:
        raise choice_error("Fisher estimator", estimator, ESTIMATORS)
    if labels is None:
        batches = reiterable(batches)  # read once for the class count, then fitted
        labels = default_labels(estimator, task, output_classes(model, task, batches))
    kwargs = {
        "labels": labels,
        "samples": samples,
        "generator": generator,
    }
    if estimator != "ekfac":
        return ESTIMATORS[estimator](model, task, targets, batches, **kwargs)
    if cache is None:
        return fit_ekfac(model, task, targets, batches, masks=masks, **kwargs)
    every = check_refit_every(refit_basis_every)
    below = check_refit_below(refit_basis_below)
    return _fit_ekfac_cached(
        model, task, targets, batches, cache, every, below, masks=masks, **kwargs
    )
