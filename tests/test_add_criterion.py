"""ARCHITECTURE.md's recipe "add a criterion", followed from outside the package.

A frozen TaylorCriterion subclass put in ``CRITERIA`` is, with nothing else changed, a valid
``--criterion`` / ``criterion.name`` everywhere: the Python API, recipe validation, the CLI
(validated against the registry when the command runs) and the CLI's help text (computed
from the registry when the CLI is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml

import prunekit
from prunekit.criteria import CRITERIA, TaylorCriterion
from prunekit.models import mlp
from prunekit.recipe import RecipeError
from prunekit.recipe_run import load_checked_recipe, validate_recipe


@dataclass(frozen=True)
class Smallest(TaylorCriterion):
    """Keeps the smallest weights (the opposite of magnitude): unmistakable in any result."""

    def combine(self, params, targets, g, curvature):
        """Score -|theta|: higher = keep, so the largest weights go first."""
        return {n: -params[n].detach().abs().float() for n in targets}


@pytest.fixture
def toy():
    """'toy' registered for the test only."""
    assert "toy" not in CRITERIA
    CRITERIA["toy"] = Smallest
    try:
        yield "toy"
    finally:
        del CRITERIA["toy"]


def recipe_file(tmp_path, checkpoint, criterion: str):
    tree = {
        "version": 1,
        "name": "toy",
        "data": "digits",
        "model": {"checkpoint": str(checkpoint)},
        "criterion": {"name": criterion},
        "schedule": {"final": 0.5, "steps": 1},
        "analysis": {"ntk": False},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_api_scores_and_prunes_with_a_registered_criterion(toy):
    torch.manual_seed(0)
    model = mlp("64,16,10")
    scores = prunekit.score(model, "digits", criterion=toy, examples=50)
    params = dict(model.named_parameters())
    assert set(scores) == {n for n in params if n.endswith("weight")} and len(scores) == 2
    for name, score in scores.items():
        assert torch.equal(score, -params[name].detach().abs())
    result = prunekit.prune(
        model, "digits", criterion=toy, sparsity=0.5, steps=1, finetune_epochs=0,
        final_epochs=0, ntk=False, score_examples=50,
    )  # fmt: skip
    assert result.report["criterion"] == "toy" and result.report["fisher"] is None
    kept, pruned = [], []
    for name, mask in result.masks.items():
        weights = -scores[name]  # |theta| before pruning (pruned weights are zero now)
        kept.append(weights[mask])
        pruned.append(weights[~mask])
    assert torch.cat(kept).max() <= torch.cat(pruned).min()  # the largest weights went


def test_recipes_accept_a_registered_criterion_and_refuse_it_unregistered(
    tmp_path, digits_model_file
):
    path = recipe_file(tmp_path, digits_model_file, "toy")
    with pytest.raises(RecipeError, match="criterion.name = 'toy' is not valid"):
        load_checked_recipe(path)
    CRITERIA["toy"] = Smallest
    try:
        recipe = load_checked_recipe(path)
        assert recipe["criterion"]["name"] == "toy"
        assert validate_recipe(recipe)["steps"] == [0.5]
    finally:
        del CRITERIA["toy"]


def test_the_cli_prunes_with_a_registered_criterion(toy, tmp_path, digits_model_file, cli):
    out = tmp_path / "run"
    code, _, stderr = cli(
        "prune", digits_model_file, "--criterion", toy, "--sparsity", "0.5", "--steps", "1",
        "--finetune-epochs", "0", "--final-epochs", "0", "--no-ntk", "--quiet", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "toy" and report["sparsity"]["global"] == 0.5


def test_the_cli_help_lists_a_criterion_registered_before_it_loads():
    probe = (
        "from prunekit.criteria import CRITERIA\n"
        "from prunekit.criteria.scores import Magnitude\n"
        "CRITERIA['toycrit'] = type('Toy', (Magnitude,), {})\n"
        "from prunekit.cli import main\n"
        "main(['prune', '--help'])\n"
    )
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "toycrit" in done.stdout and "magnitude" in done.stdout
