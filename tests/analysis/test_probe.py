"""Probe sets, ntk.jsonl records and the fine-tuning logging schedule."""

from __future__ import annotations

import json
import math

import pytest

from prunekit.analysis import log_spaced_iterations, ntk_record, select_probe
from prunekit.analysis.probe import load_probe, save_probe
from prunekit.errors import RunDirError, SettingError


def test_select_probe_is_seeded_sorted_unique_and_in_range():
    a = select_probe(1000, 300, probe_train=100, probe_val=50, seed=3)
    assert a == select_probe(1000, 300, probe_train=100, probe_val=50, seed=3)
    assert a != select_probe(1000, 300, probe_train=100, probe_val=50, seed=4)
    assert len(a["train"]) == 100 and len(set(a["train"])) == 100
    assert len(a["val"]) == 50 and len(set(a["val"])) == 50
    assert a["train"] == sorted(a["train"]) and 0 <= min(a["train"]) and max(a["train"]) < 1000
    assert max(a["val"]) < 300
    assert a["train"] != list(range(100))  # really shuffled, not the first examples


def test_select_probe_small_sets_use_everything_and_bad_sizes_raise():
    probe = select_probe(7, 0, probe_train=100, probe_val=100)
    assert probe["train"] == list(range(7)) and probe["val"] == []
    with pytest.raises(SettingError, match="-1"):
        select_probe(10, 10, probe_train=-1)


def test_probe_round_trips_through_the_run_directory(tmp_path):
    probe = select_probe(50, 50, 5, 5, seed=1)
    path = save_probe(tmp_path, probe)
    assert path.name == "probe.json" and load_probe(tmp_path) == probe
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # no temp file left
    with pytest.raises(RunDirError, match="probe.json"):
        load_probe(tmp_path / "missing")


RESULT = {
    "alignment": 0.25,
    "per_layer": {"0.weight": 0.5, "2.weight": math.nan},
    "effective_rank": 3.5,
    "trace": 12.0,
    "n": 100,
    "outputs": 10,
}


def test_ntk_record_has_the_documented_fields_and_is_strict_json():
    rec = ntk_record(3, "finetune", 40, 0.7, RESULT, {**RESULT, "alignment": 0.125})
    assert set(rec) == {
        "step", "phase", "iteration", "sparsity",
        "alignment_train", "alignment_val", "per_layer_train", "per_layer_val",
        "effective_rank_train", "effective_rank_val", "trace_train", "trace_val",
    }  # fmt: skip
    assert (rec["step"], rec["phase"], rec["iteration"], rec["sparsity"]) == (
        3,
        "finetune",
        40,
        0.7,
    )
    assert rec["alignment_train"] == 0.25 and rec["alignment_val"] == 0.125
    assert rec["per_layer_train"] == {"0.weight": 0.5, "2.weight": None}  # NaN -> null
    json.dumps(rec, allow_nan=False)


def test_ntk_record_without_validation_and_with_bad_phase():
    rec = ntk_record(0, "dense", None, 0.0, RESULT, None)
    assert rec["alignment_val"] is None and rec["per_layer_val"] is None
    assert rec["iteration"] is None
    with pytest.raises(SettingError, match="warmup"):
        ntk_record(0, "warmup", None, 0.0, RESULT)


def test_log_spaced_iterations_follow_the_paper_schedule():
    its = log_spaced_iterations(100)
    expected = sorted({0} | {int(5 * 1.15**k) for k in range(40) if int(5 * 1.15**k) <= 100})
    assert its == expected
    assert its[:6] == [0, 5, 6, 7, 8, 10] and its[-1] <= 100
    assert log_spaced_iterations(100, 2.0) == [0, 5, 10, 20, 40, 80]
    assert log_spaced_iterations(100, "x2") == [0, 5, 10, 20, 40, 80]
    assert log_spaced_iterations(0) == [0]


def test_log_spaced_iterations_stride_and_errors():
    assert log_spaced_iterations(10, 4) == [0, 4, 8]
    assert log_spaced_iterations(10, "5") == [0, 5, 10]
    for bad in (0, 1.0, "x0.5", "often", True):
        with pytest.raises(SettingError):
            log_spaced_iterations(10, bad)
    with pytest.raises(SettingError):
        log_spaced_iterations(-1)
