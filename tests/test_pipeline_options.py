"""run_pruning options: masked_scaling, ntk_every, recalibrate_bn, and the OMP_WAIT_POLICY
default set by ``import prunekit``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit.checkpoint import load_model
from prunekit.criteria.scores import TaylorCriterion
from prunekit.data import load_data
from prunekit.errors import SettingError
from prunekit.finetune import FinetuneSettings, finetune
from prunekit.loop import run_pruning
from prunekit.prune.schedules import schedule
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

TARGETS = ("1.weight", "3.weight")
N_TARGETS = 64 * 32 + 32 * 10
BASE = {
    "steps": 2,
    "score_examples": 100,
    "finetune_epochs": 0.1,
    "final_epochs": 0.1,
    "ntk": False,
    "probe_train": 30,
    "probe_val": 30,
}
RECAL_KEYS = ("loss_before_recalibration", "loss_after_recalibration")


def settings(**kw) -> PruneSettings:
    return PruneSettings(**{**BASE, **kw})


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture
def fresh(digits_model_file):
    """``fresh()`` -> a new copy of the trained 64-32-10 digits MLP (no BatchNorm)."""
    return lambda: load_model(digits_model_file).model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def zeros_over_targets(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[k] == 0).sum()) for k in TARGETS)


# ------------------------------------------------------------------ masked_scaling


@pytest.fixture
def recorded_masks(monkeypatch):
    """Every criterion.evaluate call's ``masks`` argument (cloned), in call order."""
    calls: list = []
    original = TaylorCriterion.evaluate

    def spy(self, *args, masks=None, **kwargs):
        calls.append(None if masks is None else {k: m.clone() for k, m in masks.items()})
        return original(self, *args, masks=masks, **kwargs)

    monkeypatch.setattr(TaylorCriterion, "evaluate", spy)
    return calls


@pytest.mark.parametrize("masked", [False, True])
def test_masked_scaling_passes_the_current_masks(fresh, digits, recorded_masks, masked):
    cfg = settings(criterion="obd", fisher="ekfac", sparsity=0.8, masked_scaling=masked)
    model = fresh()
    result = run_pruning(model, digits, cfg)
    assert len(recorded_masks) == cfg.steps
    # exact sparsity either way
    want = round(0.8 * N_TARGETS)
    assert zeros_over_targets(model) == want == result.report["params"]["zeros"]
    assert sum(int((~m).sum()) for m in result.masks.values()) == want
    if not masked:
        assert recorded_masks == [None] * cfg.steps
        return
    first, second = recorded_masks
    assert set(first) == set(second) == set(TARGETS)
    assert all(bool(m.all()) for m in first.values())  # step 1: nothing pruned yet
    # step 2 gets the masks of step 1: its sparsity, and a superset of the final keep-set
    pruned_after_1 = sum(int((~m).sum()) for m in second.values())
    assert pruned_after_1 == round(schedule(0.8, cfg.steps)[0] * N_TARGETS) > 0
    for k in TARGETS:
        assert bool((second[k] | ~result.masks[k]).all()), k
    assert result.report["settings"]["masked_scaling"] is True


# ------------------------------------------------------------------ ntk_every


def finetune_iterations(records: list[dict]) -> list[list[int]]:
    """Iterations logged inside each fine-tuning phase, phase by phase (step fine-tunes,
    then the final one); a phase ends at its step-boundary record."""
    phases, current = [], []
    for r in records:
        if r["phase"] == "finetune" and r["iteration"] is not None:
            current.append(r["iteration"])
        elif r["phase"] in ("finetune", "final"):
            phases.append(current)
            current = []
    return phases


def test_ntk_every_none_logs_only_at_boundaries(fresh, digits):
    cfg = settings(criterion="magnitude", sparsity=0.7, finetune_epochs=0.5, ntk=True)
    assert cfg.ntk_every == "none"  # the default
    result = run_pruning(fresh(), digits, cfg)
    phases = [(r["phase"], r["step"], r["iteration"]) for r in result.ntk]
    assert phases == [
        ("dense", 0, None),
        ("prune", 1, None),
        ("finetune", 1, None),
        ("prune", 2, None),
        ("finetune", 2, None),
        ("final", 2, None),
    ]


def test_ntk_every_stride_logs_inside_finetuning(fresh, digits):
    cfg = settings(
        criterion="magnitude", sparsity=0.7, finetune_epochs=0.5, final_epochs=0.3, ntk=True,
        ntk_every="2",
    )  # fmt: skip
    result = run_pruning(fresh(), digits, cfg)
    batches = len(digits.train_batches(cfg.batch_size, torch.Generator().manual_seed(0)))
    per_step = FinetuneSettings(epochs=0.5).total_steps(batches)
    final = FinetuneSettings(epochs=0.3).total_steps(batches)
    assert per_step >= 5 and final >= 3
    # 0 and the last iteration are the step-boundary records, not repeated inside
    assert finetune_iterations(result.ntk) == [
        list(range(2, per_step, 2)),
        list(range(2, per_step, 2)),
        list(range(2, final, 2)),
    ]
    assert all(0.0 <= r["alignment_train"] <= 1.0 for r in result.ntk if r["iteration"] is not None)


@pytest.mark.parametrize("every", ["zz", "x0.5", "x1", "0", "-2", "2.5"])
@pytest.mark.parametrize("ntk", [False, True])
def test_bad_ntk_every_raises_before_any_work(fresh, digits, every, ntk, monkeypatch):
    model = fresh()
    before = state_copy(model)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the settings were checked")

    monkeypatch.setattr(TaylorCriterion, "evaluate", no_scoring)
    with pytest.raises(SettingError, match="every") as info:
        run_pruning(model, digits, settings(criterion="obd", ntk=ntk, ntk_every=every))
    assert repr(every) in str(info.value) or every.lstrip("x-") in str(info.value)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_ntk_every_message_names_every_valid_form(fresh, digits):
    with pytest.raises(SettingError) as info:
        run_pruning(fresh(), digits, settings(criterion="obd", ntk_every="zz"))
    assert "'zz'" in str(info.value) and "none" in str(info.value)


def test_cli_options_reach_the_settings(digits_model_file, cli, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli(
        "prune", digits_model_file, "--criterion", "obd", "--fisher", "ekfac", "--sparsity",
        "0.5", "--steps", "1", "--finetune-epochs", "0", "--final-epochs", "0",
        "--score-examples", "100", "--masked-scaling", "--recalibrate-bn", "--no-ntk",
        "--ntk-every", "x1.5", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["masked_scaling"] is True
    assert report["settings"]["recalibrate_bn"] is True
    assert report["settings"]["ntk_every"] == "x1.5"
    assert report["bn_recalibration"] is True  # asked for explicitly, even without BN
    assert report["params"]["zeros"] == round(0.5 * N_TARGETS)


def test_cli_bad_ntk_every_exits_2_before_any_work(digits_model_file, cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "prune", digits_model_file, "--sparsity", "0.5", "--steps", "1",
        "--ntk-every", "x0.5", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 2
    assert "Traceback" not in stderr and "'x0.5'" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing written


# ------------------------------------------------------------------ recalibrate_bn


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )


def test_recalibration_default_off_without_batchnorm(fresh, digits):
    result = run_pruning(fresh(), digits, settings(criterion="magnitude", sparsity=0.5))
    assert result.report["bn_recalibration"] is False
    assert not any(key in row for row in result.report["steps"] for key in RECAL_KEYS)


def test_recalibration_default_on_with_batchnorm(digits):
    model = bn_model()
    cfg = settings(criterion="magnitude", sparsity=0.5)
    assert cfg.recalibrate_bn is None
    result = run_pruning(model, digits, cfg)
    report = result.report
    assert report["bn_recalibration"] is True
    assert len(report["steps"]) == cfg.steps
    for row in report["steps"]:
        for key in RECAL_KEYS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["step"], key)
        assert row["loss_before_recalibration"] == row["loss_after_prune"]
    assert model[2].num_batches_tracked > 0  # the BN layer's statistics were (re)estimated
    assert json.loads(json.dumps(report)) == report  # still JSON-able


def test_recalibration_can_be_turned_off_with_batchnorm(digits):
    result = run_pruning(
        bn_model(), digits, settings(criterion="magnitude", sparsity=0.5, recalibrate_bn=False)
    )
    assert result.report["bn_recalibration"] is False
    assert not any(key in row for row in result.report["steps"] for key in RECAL_KEYS)


def test_recalibration_resets_stale_statistics(digits):
    """With fine-tuning off, the step's statistics come only from the recalibration: stale
    running statistics (set far off before the run) are replaced by the training batches'."""
    model = bn_model()
    gen = torch.Generator().manual_seed(0)
    phase = FinetuneSettings(epochs=2, lr=0.1, weight_decay=0.0)
    finetune(model, ClassificationTask(), digits.train_batches(50, gen), phase)
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.fill_(50.0)
        bn.running_var.fill_(1e-4)
    cfg = settings(criterion="magnitude", sparsity=0.5, steps=1, finetune_epochs=0, final_epochs=0)
    report = run_pruning(model, digits, cfg).report
    row = report["steps"][0]
    assert row["loss_after_recalibration"] < 0.5 * row["loss_before_recalibration"]
    assert report["metrics"]["finetuned"]["accuracy"] > 0.5  # recalibrated: it works again
    assert float(bn.running_mean.abs().max()) < 50.0
    assert float(bn.running_var.min()) > 1e-4


# ------------------------------------------------------------------ OMP_WAIT_POLICY

PROBE = """
import json, os, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Spy())
import prunekit
print(json.dumps({"env": os.environ.get("OMP_WAIT_POLICY"), "at_torch": seen.get("torch")}))
"""


def import_prunekit(policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_sets_passive_wait_policy_before_torch_loads():
    assert import_prunekit(None) == {"env": "PASSIVE", "at_torch": "PASSIVE"}


def test_import_keeps_the_callers_wait_policy():
    assert import_prunekit("ACTIVE") == {"env": "ACTIVE", "at_torch": "ACTIVE"}
