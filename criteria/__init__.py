"""Scores and curvature (prunekit.criteria)."""

from prunekit.criteria.curvature import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    default_labels,
    fit_curvature,
)
from prunekit.criteria.diag import Diag, fit_diag
from prunekit.criteria.ekfac import EKFAC, EKFACBasis, eigenbasis, fit_ekfac, refit_scaling
from prunekit.criteria.fisher import LABELS, mean_gradient, squared_gradient_sums
from prunekit.criteria.kfac import KFAC, fit_kfac
from prunekit.criteria.obs import joint_update, obs_saliency, obs_update, rows_update
from prunekit.criteria.scores import (
    CRITERIA,
    OBS,
    ScoreResult,
    TaylorCriterion,
    make_criterion,
    taylor_score,
)
from prunekit.criteria.sparsegpt import SparseGPT
from prunekit.criteria.wanda import Wanda, input_sq_norms, wanda_score

CRITERIA["wanda"] = Wanda  # registered here: wanda.py builds on scores.TaylorCriterion
CRITERIA["sparsegpt"] = SparseGPT

__all__ = [
    "CRITERIA",
    "DEFAULT_ESTIMATOR",
    "EKFAC",
    "ESTIMATORS",
    "LABELS",
    "OBS",
    "Diag",
    "EKFACBasis",
    "KFAC",
    "ScoreResult",
    "SparseGPT",
    "TaylorCriterion",
    "Wanda",
    "default_labels",
    "eigenbasis",
    "fit_curvature",
    "fit_diag",
    "fit_ekfac",
    "fit_kfac",
    "input_sq_norms",
    "joint_update",
    "make_criterion",
    "mean_gradient",
    "obs_saliency",
    "obs_update",
    "rows_update",
    "refit_scaling",
    "squared_gradient_sums",
    "taylor_score",
    "wanda_score",
]
