"""Scores and curvature (prunekit.criteria)."""

from prunekit.criteria.curvature import ESTIMATORS, Diag, fit_curvature, fit_diag
from prunekit.criteria.fisher import LABELS, mean_gradient, squared_gradient_sums
from prunekit.criteria.scores import CRITERIA, ScoreResult, make_criterion, taylor_score

__all__ = [
    "CRITERIA",
    "ESTIMATORS",
    "LABELS",
    "Diag",
    "ScoreResult",
    "fit_curvature",
    "fit_diag",
    "make_criterion",
    "mean_gradient",
    "squared_gradient_sums",
    "taylor_score",
]
