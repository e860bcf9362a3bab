"""Curvature estimators: values with one operation the pruner needs, ``diagonal()``.

``ESTIMATORS`` maps a name (CLI ``--fisher``) to a fit function
``fit(model, task, targets, batches, *, labels, samples, generator) -> curvature``;
the returned value has ``diagonal() -> dict[str, Tensor]`` (parameter space, shaped like
each target) and ``estimators() -> dict[str, str]`` (which estimator each target got).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from prunekit.criteria.fisher import squared_gradient_sums
from torch import Tensor, nn

from prunekit.errors import choice_error
from prunekit.types import Batch, Target, Task


@dataclass(frozen=True)
class Diag:
    """Diagonal Fisher: mean over examples of squared per-example gradients.

    values: name -> tensor shaped like the target (float32, float64 for float64 models);
    labels: 'exact' | 'sampled' | 'empirical'; examples: number of examples seen.
    """

    values: dict[str, Tensor]
    labels: str
    examples: int

    def diagonal(self) -> dict[str, Tensor]:
        """The Fisher diagonal per target, in parameter space."""
        return dict(self.values)

    def estimators(self) -> dict[str, str]:
        """Which estimator each target got (all 'diag' here)."""
        return {name: "diag" for name in self.values}


def fit_diag(
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    *,
    labels: str = "exact",
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Diag:
    """Fit the diagonal Fisher of every target (see ``criteria.fisher`` for label modes)."""
    sums, seen = squared_gradient_sums(model, task, targets, batches, labels, samples, generator)
    return Diag({n: s / seen for n, s in sums.items()}, labels, seen)


ESTIMATORS: dict[str, Callable[..., object]] = {"diag": fit_diag}


def fit_curvature(estimator: str, model, task, targets, batches, **kwargs):
    """Dispatch to the registered estimator ``estimator``; SettingError if unknown."""
    if estimator not in ESTIMATORS:
        raise choice_error("Fisher estimator", estimator, ESTIMATORS)
    return ESTIMATORS[estimator](model, task, targets, batches, **kwargs)
