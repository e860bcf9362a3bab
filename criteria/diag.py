"""The diagonal Fisher estimator as a curvature value (``Diag``) and its fit function."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.criteria.fisher import squared_gradient_sums
from prunekit.types import Batch, LabelKey, Target, Task


def damping_value(values: Tensor, damping: float, absolute: float) -> float:
    """Tikhonov damping ``damping * mean(values) + absolute`` (relative + absolute part).

    ``values`` are the curvature's eigenvalues (EKFAC: S; diag: the diagonal itself), so
    ``damping`` is unit-free and ``absolute`` is in loss units per squared weight.
    """
    return float(damping) * float(values.double().mean()) + float(absolute)


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

    def inverse_diagonal(self, damping: float = 1e-3, absolute: float = 0.0) -> dict[str, Tensor]:
        """diag((F + lam I)^-1) = 1 / (d + lam), lam = damping * mean(d) + absolute per target."""
        return {n: 1.0 / (d + damping_value(d, damping, absolute)) for n, d in self.values.items()}

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
    generator: torch.Generator | LabelKey | None = None,
) -> Diag:
    """Fit the diagonal Fisher of every target (see ``criteria.fisher`` for label modes).

    generator: where sampled labels come from (a ``LabelKey``, or a torch.Generator whose
    one draw seeds one); each example's labels are keyed by its index, not its batch.
    """
    sums, seen = squared_gradient_sums(model, task, targets, batches, labels, samples, generator)
    return Diag({n: s / seen for n, s in sums.items()}, labels, seen)
