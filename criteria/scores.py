"""Pruning criteria: local Taylor models of the loss change when a weight is set to zero.

score_q = | -g_q * theta_q + 0.5 * d_q * theta_q^2 | + 0.5 * lambda * theta_q^2
(methods.md 1.3): magnitude g=0, d=1; lm d=0; qm both; obd g=0. Higher score = keep.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from prunekit.criteria.curvature import fit_curvature
from prunekit.criteria.fisher import LABELS, check_labels, mean_gradient
from torch import Tensor, nn

from prunekit.errors import SettingError, choice_error
from prunekit.types import Batch, Scores, Target, Task


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
    """Scores (name -> float32 tensor, higher = keep) and the estimator each target got."""

    scores: Scores
    estimators: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaylorCriterion:
    """Base of the registered criteria; fields are the settings.

    lam: locality penalty lambda >= 0; fisher: curvature estimator name; labels: Fisher
    labels ('exact', 'sampled', 'empirical'); samples: labels drawn per example when sampled.
    """

    lam: float = 0.0
    fisher: str = "diag"
    labels: str = "exact"
    samples: int = 1
    uses_gradient: ClassVar[bool] = False
    uses_curvature: ClassVar[bool] = False

    def __post_init__(self) -> None:
        lam = float(self.lam)
        if not lam >= 0.0 or lam == float("inf"):
            raise SettingError(f"lambda {self.lam!r} must be a finite number >= 0")
        if self.labels not in LABELS:
            raise choice_error("Fisher labels", self.labels, LABELS)

    def evaluate(
        self,
        model: nn.Module,
        task: Task,
        targets: dict[str, Target],
        batches: Iterable[Batch],
        generator: torch.Generator | None = None,
    ) -> ScoreResult:
        """Score every target; batches must be re-iterable (a list) when both g and d are used."""
        params = dict(model.named_parameters())
        batches = list(batches) if self.uses_gradient or self.uses_curvature else []
        g = mean_gradient(model, task, targets, batches) if self.uses_gradient else {}
        d, estimators = {}, {}
        if self.uses_curvature:
            check_labels(self.labels, task, self.samples)
            curv = fit_curvature(
                self.fisher,
                model,
                task,
                targets,
                batches,
                labels=self.labels,
                samples=self.samples,
                generator=generator,
            )
            d, estimators = curv.diagonal(), curv.estimators()
        elif not self.uses_gradient:
            d = {n: torch.ones_like(params[n]) for n in targets}
        scores = {n: taylor_score(params[n], g.get(n), d.get(n), self.lam) for n in targets}
        return ScoreResult(scores, estimators)

    def score(self, model, task, targets, batches, generator=None) -> Scores:
        """Scores only (see ``evaluate``)."""
        return self.evaluate(model, task, targets, batches, generator).scores


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


CRITERIA: dict[str, type[TaylorCriterion]] = {
    "magnitude": Magnitude,
    "lm": LM,
    "qm": QM,
    "obd": OBD,
}


def make_criterion(name: str, **settings) -> TaylorCriterion:
    """The registered criterion ``name`` with ``settings``; SettingError if unknown."""
    if name not in CRITERIA:
        raise choice_error("criterion", name, CRITERIA)
    return CRITERIA[name](**settings)
