"""Options that would do nothing for the chosen criterion are refused, naming the option."""

from __future__ import annotations

import pytest

from prunekit.data import load_data
from prunekit.errors import SettingError
from prunekit.models import mlp
from prunekit.preflight import validate
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

IDLE = [
    ({"criterion": "magnitude", "fisher": "ekfac"}, "--fisher 'ekfac' does nothing"),
    ({"criterion": "lm", "labels": "exact"}, "--fisher-labels 'exact' does nothing"),
    ({"criterion": "obd", "labels": "exact", "samples": 4}, "--fisher-samples 4 does nothing"),
    ({"criterion": "obd", "fisher": "kfac", "refit_basis_every": 2}, "ekfac estimator only"),
    ({"criterion": "magnitude", "masked_scaling": True}, "--masked-scaling"),
    ({"criterion": "obd", "fisher": "kfac", "refit_basis_below": 0.3}, "--refit-basis-below 0.3"),
]


@pytest.fixture(scope="module")
def digits():
    return load_data("synthetic?n=60&dim=8&classes=3")


@pytest.mark.parametrize(("settings", "message"), IDLE, ids=[m for _, m in IDLE])
def test_idle_option_is_refused(digits, settings, message):
    with pytest.raises(SettingError, match=message.replace("(", r"\(")):
        validate(PruneSettings(**settings), mlp("8,6,3"), digits, ClassificationTask())


@pytest.mark.parametrize(
    "settings",
    [
        {"criterion": "obd", "fisher": "ekfac", "refit_basis_every": 2},
        {"criterion": "obd", "labels": "sampled", "samples": 4},
        {"criterion": "qm", "fisher": "diag", "labels": "empirical"},  # default refit_basis_below
        {"criterion": "obd", "fisher": "kfac", "refit_basis_below": 0.0},  # off: nothing idle
        {"criterion": "magnitude"},
    ],
)
def test_options_that_act_are_accepted(digits, settings):
    crit, steps, targets = validate(
        PruneSettings(**settings), mlp("8,6,3"), digits, ClassificationTask()
    )
    assert crit.uses_curvature == (settings["criterion"] != "magnitude")
    assert len(steps) == 10 and len(targets) == 2
