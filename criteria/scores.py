"""Pruning criteria: local Taylor models of the loss change when a weight is set to zero.

score_q = | -g_q * theta_q + 0.5 * d_q * theta_q^2 | + 0.5 * lambda * theta_q^2
(methods.md 1.3): magnitude g=0, d=1; lm d=0; qm both; obd g=0. obs: theta_q^2 /
(2 [(F + lam I)^-1]_qq) (methods.md 2.7). Higher score = keep.

Curvature (qm, obd, obs) comes from ``fit_curvature``: EKFAC by default, with the labels of
``default_labels`` when ``labels`` is None. Criteria are stateless frozen dataclasses; a
caller that prunes in steps keeps one ``cache`` dict and passes it to every ``evaluate``
so EKFAC keeps its eigenbasis between steps (see ``TaylorCriterion.evaluate``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from prunekit.criteria.curvature import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    check_refit_below,
    check_refit_every,
    default_labels,
    fit_curvature,
    output_classes,
)
from prunekit.criteria.fisher import LABELS, check_labels, mean_gradient
from prunekit.criteria.obs import obs_saliency
from prunekit.errors import SettingError, choice_error
from prunekit.types import Batch, LabelKey, Masks, Scores, Target, Task


def taylor_score(theta: Tensor, g: Tensor | None, d: Tensor | None, lam: float) -> Tensor:
    """Per-weight score |-g*theta + 0.5*d*theta^2| + 0.5*lam*theta^2, float32.

    g: mean loss gradient (None = 0); d: curvature diagonal (None = 0); all shaped like
    theta. Higher = more loss change if removed = keep.
    """
    theta = theta.detach().double()
    change = torch.zeros_like(theta)
    if g is not None:
        change = change - g.double() * theta
    if d is not None:
        change = change + 0.5 * d.double() * theta.pow(2)
    return (change.abs() + 0.5 * lam * theta.pow(2)).float()


@dataclass(frozen=True)
class ScoreResult:
    """Scores (name -> float32 tensor, higher = keep), the estimator each target got, and
    the fitted curvature value (None for magnitude/lm), e.g. for ``obs_update``."""

    scores: Scores
    estimators: dict[str, str] = field(default_factory=dict)
    curvature: object | None = None


@dataclass(frozen=True)
class TaylorCriterion:
    """Base of the registered criteria; fields are the settings.

    lam: locality penalty lambda >= 0; fisher: curvature estimator name ('ekfac' default,
    'kfac', 'diag'); labels: Fisher labels ('exact', 'sampled', 'empirical'; None at
    construction becomes the default: 'exact' on classifiers with at most 32 classes,
    'sampled' otherwise, see ``curvature.default_labels``); samples: labels drawn per
    example when sampled; refit_basis_every: with a ``cache``, fit a new EKFAC eigenbasis
    every N-th step (0 = keep the first one and refit only the scaling); refit_basis_below:
    also fit a new one once the kept fraction of target weights has fallen to this fraction
    of its value at the last fit (0 = off).
    """

    lam: float = 0.0
    fisher: str = DEFAULT_ESTIMATOR
    labels: str | None = None
    samples: int = 1
    refit_basis_every: int = 0
    refit_basis_below: float = 0.0
    uses_gradient: ClassVar[bool] = False
    uses_curvature: ClassVar[bool] = False

    def __post_init__(self) -> None:
        lam = float(self.lam)
        if not lam >= 0.0 or lam == float("inf"):
            raise SettingError(f"lambda {self.lam!r} must be a finite number >= 0")
        if self.fisher not in ESTIMATORS:
            raise choice_error("Fisher estimator", self.fisher, ESTIMATORS)
        # resolved at once for a classifier, so ``crit.labels`` is always concrete; a task
        # without categorical outputs gets its own default in ``labels_for``
        object.__setattr__(self, "_labels_defaulted", self.labels is None)
        if self.labels is None:
            object.__setattr__(self, "labels", default_labels(self.fisher))
        if self.labels not in LABELS:
            raise choice_error("Fisher labels", self.labels, LABELS)
        check_refit_every(self.refit_basis_every)
        check_refit_below(self.refit_basis_below)

    def labels_for(self, task: Task | None, classes: int | None = None) -> str:
        """The Fisher labels used on ``task`` with ``classes`` outputs (None = unknown): the
        given ones, else the default for that task (``curvature.default_labels``)."""
        if self._labels_defaulted:
            return default_labels(self.fisher, task, classes)
        return self.labels

    def evaluate(
        self,
        model: nn.Module,
        task: Task,
        targets: dict[str, Target],
        batches: Iterable[Batch],
        generator: torch.Generator | LabelKey | None = None,
        *,
        masks: Masks | None = None,
        cache: dict | None = None,
    ) -> ScoreResult:
        """Score every target; batches must be re-iterable (a list) when both g and d are used.

        masks (True = keep): the current masks, so pruned weights contribute nothing to
        EKFAC's scaling. cache: one dict the caller keeps for a whole pruning run (EKFAC
        keeps its eigenbasis there, see ``refit_basis_every``); None = fit from scratch.
        The result carries the fitted curvature (for ``obs_update``). generator: the
        sampled labels' key (``types.LabelKey``; a pruning run keys it by seed and step).
        """
        params = dict(model.named_parameters())
        batches = list(batches) if self.uses_gradient or self.uses_curvature else []
        g = mean_gradient(model, task, targets, batches) if self.uses_gradient else {}
        curv, estimators = None, {}
        if self.uses_curvature:
            classes = output_classes(model, task, batches) if self._labels_defaulted else None
            labels = self.labels_for(task, classes)
            check_labels(labels, task, self.samples)
            curv = fit_curvature(
                self.fisher,
                model,
                task,
                targets,
                batches,
                labels=labels,
                samples=self.samples,
                generator=generator,
                masks=masks,
                cache=cache,
                refit_basis_every=self.refit_basis_every,
                refit_basis_below=self.refit_basis_below,
            )
            estimators = curv.estimators()
        return ScoreResult(self.combine(params, targets, g, curv), estimators, curv)

    def combine(self, params, targets, g: dict[str, Tensor], curvature) -> Scores:
        """Scores from the mean gradient ``g`` and the curvature value (Taylor model)."""
        if curvature is not None:
            d = curvature.diagonal()
        elif not self.uses_gradient:
            d = {n: torch.ones_like(params[n]) for n in targets}
        else:
            d = {}
        return {n: taylor_score(params[n], g.get(n), d.get(n), self.lam) for n in targets}

    def score(self, model, task, targets, batches, generator=None, **kwargs) -> Scores:
        """Scores only (see ``evaluate``)."""
        return self.evaluate(model, task, targets, batches, generator, **kwargs).scores


@dataclass(frozen=True)
class Magnitude(TaylorCriterion):
    """Magnitude pruning: 0.5*(1+lambda)*theta^2 (ranks like |theta|)."""


@dataclass(frozen=True)
class LM(TaylorCriterion):
    """First-order Taylor model: |g*theta| + 0.5*lambda*theta^2."""

    uses_gradient: ClassVar[bool] = True


@dataclass(frozen=True)
class QM(TaylorCriterion):
    """Diagonal quadratic model: |-g*theta + 0.5*F*theta^2| + 0.5*lambda*theta^2."""

    uses_gradient: ClassVar[bool] = True
    uses_curvature: ClassVar[bool] = True


@dataclass(frozen=True)
class OBD(TaylorCriterion):
    """Optimal Brain Damage with the Fisher: 0.5*F*theta^2 + 0.5*lambda*theta^2."""

    uses_curvature: ClassVar[bool] = True


@dataclass(frozen=True)
class OBS(TaylorCriterion):
    """Optimal Brain Surgeon saliency theta^2 / (2 [(F + lam I)^-1]_qq) (methods.md 2.7).

    The damping is per target: lam = damping * mean(curvature eigenvalues) + ``lam``
    (``lam`` acts as the absolute locality penalty: the saliency of the OBS step under
    loss + lam/2 ||delta||^2). ``obs_update`` gives the compensating update.
    """

    damping: float = 1e-3
    uses_curvature: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        value = float(self.damping)
        if not value >= 0.0 or value == float("inf"):
            raise SettingError(f"OBS damping {self.damping!r} must be a finite number >= 0")

    def combine(self, params, targets, g, curvature) -> Scores:
        """OBS saliency from the curvature's damped inverse diagonal."""
        inv = curvature.inverse_diagonal(self.damping, self.lam)
        return {n: obs_saliency(params[n], inv[n]) for n in targets}


CRITERIA: dict[str, type[TaylorCriterion]] = {
    "magnitude": Magnitude,
    "lm": LM,
    "qm": QM,
    "obd": OBD,
    "obs": OBS,
}


def make_criterion(name: str, **settings) -> TaylorCriterion:
    """The registered criterion ``name`` with ``settings``; SettingError if unknown."""
    if name not in CRITERIA:
        raise choice_error("criterion", name, CRITERIA)
    cls = CRITERIA[name]
    known = sorted(f for f in cls.__dataclass_fields__ if not f.startswith("uses_"))
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SettingError(f"unknown settings {unknown} for criterion {name!r}; valid: {known}")
    return cls(**settings)
