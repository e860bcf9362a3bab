"""run_pruning behaviours: exact zeros and saved masks, monotone steps, the paper's mode,
OBS compensation, NTK logging and its default, determinism, layer scope."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from prunekit.checkpoint import load_model
from prunekit.data import load_data
from prunekit.errors import SettingError
from prunekit.loop import run_pruning
from prunekit.ntklog import NTK_MAX_OUTPUTS, NTK_MAX_WEIGHTS, ntk_is_cheap
from prunekit.prune.schedules import schedule
from prunekit.report import write_run
from prunekit.settings import PruneSettings

TARGETS = ("1.weight", "3.weight")
BIASES = ("1.bias", "3.bias")
BASE = {
    "steps": 3,
    "score_examples": 150,
    "finetune_epochs": 0.1,
    "final_epochs": 0.1,
    "ntk": False,
    "probe_train": 40,
    "probe_val": 40,
}


def settings(**kw) -> PruneSettings:
    return PruneSettings(**{**BASE, **kw})


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture
def fresh(digits_model_file):
    """``fresh()`` -> a new copy of the trained 64-32-10 digits MLP."""
    return lambda: load_model(digits_model_file).model


def read_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ zeros, masks, monotone steps


@pytest.fixture(scope="module")
def obd_run(digits_model_file, digits, tmp_path_factory):
    model = load_model(digits_model_file).model
    result = run_pruning(model, digits, settings(criterion="obd", fisher="diag", sparsity=0.85))
    out = tmp_path_factory.mktemp("pipeline") / "run"
    write_run(out, result, None, "digits")
    return result, out


def test_pruned_weights_exactly_zero_and_saved_masks_match_weights(obd_run):
    result, out = obd_run
    params = dict(result.model.named_parameters())
    n = sum(params[t].numel() for t in TARGETS)
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.85 * n)
    saved_masks = read_safetensors(out / "masks.safetensors")
    saved_weights = read_safetensors(out / "model.safetensors")
    assert set(saved_masks) == set(TARGETS)
    for name in TARGETS:
        assert bool((params[name][~result.masks[name]] == 0).all())  # exactly 0 at the end
        assert torch.equal(saved_masks[name].bool(), result.masks[name].cpu())
        assert torch.equal(saved_masks[name].bool(), saved_weights[name] != 0)
        assert torch.equal(saved_weights[name], params[name].detach())


def test_per_step_sparsity_is_monotone_and_follows_the_schedule(obd_run):
    result, _ = obd_run
    rows = result.metrics
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["sparsity"] == 0.0
    n = result.report["params"]["prunable"]
    for row, target in zip(rows[1:], schedule(0.85, 3), strict=True):
        assert row["sparsity"] == pytest.approx(round(target * n) / n, abs=1e-12)
    for prev, row in zip(rows, rows[1:], strict=False):
        assert row["sparsity"] > prev["sparsity"]
        for name in TARGETS:
            assert row["per_layer"][name] >= prev["per_layer"].get(name, 0.0), name
    for row in rows:
        assert math.isfinite(row["loss_after_prune"]) and math.isfinite(row["loss_after_finetune"])


# ------------------------------------------------------------------ paper mode


def test_paper_mode_changes_weights_only_in_the_final_finetune(fresh, digits):
    model = fresh()
    dense = params_of(model)
    seen = []

    def progress(label, done, total):
        if label == "steps":  # after each step: only zeroing may have happened so far
            seen.append(params_of(model))

    result = run_pruning(
        model,
        digits,
        settings(criterion="magnitude", sparsity=0.8, finetune_epochs=0, final_epochs=0.1),
        progress=progress,
    )
    assert len(seen) == 3
    for snap in seen:
        for name in BIASES:
            assert torch.equal(snap[name], dense[name]), name
        for name in TARGETS:
            kept = snap[name] != 0
            assert torch.equal(snap[name][kept], dense[name][kept]), name
    for row in result.metrics[1:]:
        assert row["loss_after_finetune"] == row["loss_after_prune"], row["step"]
    final = params_of(model)
    assert not torch.equal(final["1.bias"], dense["1.bias"])  # the final fine-tune ran
    assert result.report["metrics"]["finetuned"]["loss"] != result.metrics[-1]["loss_after_prune"]


# ------------------------------------------------------------------ OBS compensation


@pytest.fixture(scope="module")
def compensation_runs(digits_model_file, digits):
    kw = {"criterion": "obd", "fisher": "ekfac", "sparsity": 0.6, "steps": 2,
          "finetune_epochs": 0, "final_epochs": 0, "update": "none"}  # fmt: skip
    runs = {}  # update 'none': auto would be 'rows' without fine-tuning
    for compensate in (False, True):
        model = load_model(digits_model_file).model
        runs[compensate] = run_pruning(model, digits, settings(compensate=compensate, **kw))
    return runs


def test_compensation_records_losses_and_moves_surviving_weights(compensation_runs):
    plain, comp = compensation_runs[False], compensation_runs[True]
    for row in comp.metrics[1:]:
        before, after = row["loss_before_compensation"], row["loss_after_compensation"]
        assert math.isfinite(before) and math.isfinite(after)
        assert before == row["loss_after_prune"]  # measured right after zeroing
        assert after == pytest.approx(row["loss_after_finetune"])  # no fine-tune: unchanged
        assert before != after
    assert all("loss_before_compensation" not in row for row in plain.metrics)
    p_plain, p_comp = params_of(plain.model), params_of(comp.model)
    moved = 0
    for name in TARGETS:
        keep = comp.masks[name]
        assert bool((p_comp[name][~keep] == 0).all())  # removed weights stay exactly 0
        both = keep & plain.masks[name]
        moved += int((p_comp[name][both] != p_plain[name][both]).sum())
    assert moved > 0


def test_compensation_losses_reach_report_json(compensation_runs):
    for row in compensation_runs[True].report["steps"]:
        assert "loss_before_compensation" in row and "loss_after_compensation" in row


@pytest.mark.parametrize(
    ("criterion", "fisher"), [("magnitude", None), ("lm", None), ("obd", "diag")]
)
def test_compensation_needs_kfac_or_ekfac(fresh, digits, criterion, fisher):
    model = fresh()
    before = params_of(model)
    with pytest.raises(SettingError, match=criterion) as info:
        run_pruning(model, digits, settings(criterion=criterion, fisher=fisher, compensate=True))
    assert "kfac" in str(info.value) and "ekfac" in str(info.value)
    after = params_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ NTK


def test_ntk_on_logs_every_phase_and_writes_probe(fresh, digits, tmp_path):
    cfg = settings(
        criterion="magnitude", sparsity=0.7, steps=2, finetune_epochs=0.25, ntk=True, ntk_every="2"
    )  # 4 iterations per step: logged at 2
    result = run_pruning(fresh(), digits, cfg)
    files = write_run(tmp_path, result, None, "digits")
    assert (tmp_path / "probe.json").is_file() and (tmp_path / "ntk.jsonl") in files
    records = [json.loads(x) for x in (tmp_path / "ntk.jsonl").read_text().splitlines()]
    assert records == json.loads(json.dumps(result.ntk))
    assert {r["phase"] for r in records} == {"dense", "prune", "finetune", "final"}
    assert [r["phase"] for r in records][0] == "dense" and records[-1]["phase"] == "final"
    assert any(r["phase"] == "finetune" and r["iteration"] is not None for r in records)
    for r in records:
        for key in ("alignment_train", "alignment_val"):
            assert r[key] is not None and 0.0 <= r[key] <= 1.0, (r["phase"], key)
        assert set(r["per_layer_train"]) == set(TARGETS)
    for row in result.metrics:
        assert 0.0 <= row["ntk_alignment"] <= 1.0
    assert result.report["ntk"]["enabled"] is True
    assert 0.0 <= result.report["ntk"]["final_alignment"] <= 1.0
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert len(probe["train"]) == 40 and len(probe["val"]) == 40


def test_ntk_default_limits():
    assert ntk_is_cheap(NTK_MAX_OUTPUTS, NTK_MAX_WEIGHTS)
    assert not ntk_is_cheap(NTK_MAX_OUTPUTS + 1, 1000)
    assert not ntk_is_cheap(2, NTK_MAX_WEIGHTS + 1)


def test_ntk_default_is_off_and_the_report_says_how_to_turn_it_on(fresh, digits):
    """An analysis on by default may cost at most 15% of the run; the NTK log costs 1-5x
    (BENCHMARKS.md), so it is off unless asked for, even on a small model."""
    cfg = settings(criterion="magnitude", steps=1, finetune_epochs=0, final_epochs=0, ntk=None)
    result = run_pruning(fresh(), digits, cfg)
    assert result.report["ntk"]["enabled"] is False and result.ntk == []
    assert result.probe is None and result.report["ntk"]["final_alignment"] is None
    assert "--ntk" in result.report["ntk"]["note"]
    assert all(row["ntk_alignment"] is None for row in result.metrics)


def test_ntk_asked_for_above_the_limits_is_logged_with_a_warning(digits, caplog):
    from prunekit.ntklog import ntk_log_for
    from prunekit.prune.targets import find_targets
    from prunekit.types import ClassificationTask

    torch.manual_seed(0)
    hidden = NTK_MAX_WEIGHTS // 64 + 100  # 64*hidden + 10*hidden target weights > the limit
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    targets = find_targets(model)
    task = ClassificationTask()
    assert ntk_log_for(model, task, digits, settings(ntk=None), targets) is None
    with caplog.at_level("WARNING", logger="prunekit"):
        log = ntk_log_for(model, task, digits, settings(ntk=True), targets)
    assert log is not None and "may take longer than the run" in caplog.text


# ------------------------------------------------------------------ determinism, layer scope


def test_same_seed_gives_bit_identical_masks_and_weights(fresh, digits):
    cfg = settings(criterion="obd", fisher="diag", labels="sampled", sparsity=0.8, steps=2)
    a = run_pruning(fresh(), digits, cfg)
    b = run_pruning(fresh(), digits, cfg)
    c = run_pruning(fresh(), digits, settings(**{**cfg.__dict__, "seed": 1}))
    for name in TARGETS:
        assert torch.equal(a.masks[name], b.masks[name])
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss_after_finetune"] for r in a.metrics] == [
        r["loss_after_finetune"] for r in b.metrics
    ]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the seed really matters


def test_layer_scope_gives_every_target_its_exact_count(fresh, digits):
    result = run_pruning(fresh(), digits, settings(criterion="obd", fisher="diag", scope="layer",
                                                   sparsity=0.7, steps=2))  # fmt: skip
    params = dict(result.model.named_parameters())
    for name in TARGETS:
        n_l = params[name].numel()
        assert int((~result.masks[name]).sum()) == round(0.7 * n_l), name
        assert int((params[name] == 0).sum()) == round(0.7 * n_l), name
    for row, s in zip(result.metrics[1:], schedule(0.7, 2), strict=True):
        for name in TARGETS:
            n_l = params[name].numel()
            assert row["per_layer"][name] == pytest.approx(round(s * n_l) / n_l, abs=1e-12)
