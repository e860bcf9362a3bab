"""Issue 13, plot: a folder that is not a run, or a run whose metrics.jsonl / ntk.jsonl is
malformed, ends in one RunDirError line naming the file (and line), and nothing is drawn."""

from __future__ import annotations

import json
import os

import pytest

from prunekit.analysis import plot_run
from prunekit.analysis.plots import read_run
from prunekit.errors import RunDirError

GOOD = {
    "step": 0, "sparsity": 0.0, "per_layer": {"0.weight": 0.0}, "loss_after_prune": 0.5,
    "accuracy_after_prune": 0.9, "loss_after_finetune": 0.4, "accuracy": 0.91, "seconds": 1.0,
    "ntk_alignment": None,
}  # fmt: skip


def run_dir(tmp_path, metrics: bytes | str, ntk: bytes | str | None = None):
    run = tmp_path / "run"
    run.mkdir()
    for name, body in (("metrics.jsonl", metrics), ("ntk.jsonl", ntk)):
        if body is not None:
            data = body if isinstance(body, bytes) else body.encode()
            (run / name).write_bytes(data)
    return run


def rows(*changes: dict, drop: str | None = None) -> str:
    out = []
    for step, change in enumerate(changes):
        row = {**GOOD, "step": step, **change}
        out.append(json.dumps({k: v for k, v in row.items() if k != drop}))
    return "\n".join(out) + "\n"


CASES = {
    "malformed JSON": ('{"step": 0,\n', "metrics.jsonl: line 1 is not valid JSON"),
    "bad second line": (rows({}) + "not json\n", "metrics.jsonl: line 2 is not valid JSON"),
    "missing step": ('{"foo": 1}\n{"bar": 2}\n', "metrics.jsonl: line 1 lacks the key 'step'"),
    "missing loss": (rows({}, {}, drop="loss_after_finetune"), "lacks the key 'loss_after_fin"),
    "step is a string": (rows({"step": "zero"}), "line 1: 'step' is \"zero\", not an integer"),
    "sparsity a string": (rows({"sparsity": "half"}), "'sparsity' is \"half\", not a number or"),
    "loss a list": (rows({}, {"loss_after_prune": [1]}), "line 2: 'loss_after_prune' is [1]"),
    "accuracy a bool": (rows({"accuracy": True}), "'accuracy' is true, not a number or null"),
    "per_layer strings": (rows({"per_layer": {"a": "x"}}), "'per_layer' must map layer names"),
    "negative step": (rows({"step": -1}), "'step' is -1, not a step number >= 0"),
    "not UTF-8": (b'{"step": 0, "loss": "\xff\xfe"}\n', "metrics.jsonl: line 1 is not UTF-8"),
    "arrays, not objects": ("[1, 2]\n3\n", "metrics.jsonl: line 1 is not a JSON object"),
    "empty": ("", "metrics.jsonl: holds no steps"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_metrics_name_the_file_and_line_and_draw_nothing(case, tmp_path):
    body, expected = CASES[case]
    run = run_dir(tmp_path, body)
    with pytest.raises(RunDirError) as info:
        plot_run(run)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert not (run / "plots").exists()


def test_malformed_ntk_records_are_refused_before_any_plot(tmp_path):
    bad_phase = json.dumps({"step": 1, "phase": "warmup", "iteration": None})
    run = run_dir(tmp_path, rows({}, {}), ntk=bad_phase + "\n")
    with pytest.raises(RunDirError, match=r"ntk.jsonl: line 1: 'phase' is 'warmup', not one of"):
        plot_run(run)
    assert not (run / "plots").exists()  # metrics plots were not drawn first


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda t: t / "nothere", "run directory '{p}' does not exist"),
        (lambda t: (t / "f.txt", (t / "f.txt").write_text("hi"))[0], "'{p}' is a file"),
        (lambda t: (t / "empty", (t / "empty").mkdir())[0],
         "{p}: no metrics.jsonl, so not a prunekit run directory (a run holds metrics.jsonl "
         "and report.json)"),
    ],
)  # fmt: skip
def test_folders_that_are_not_runs(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(RunDirError) as info:
        read_run(path)
    assert expected.format(p=path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_metrics_file(tmp_path):
    run = run_dir(tmp_path, rows({}))
    (run / "metrics.jsonl").chmod(0)
    with pytest.raises(RunDirError, match="metrics.jsonl: cannot read"):
        plot_run(run)


def test_well_formed_run_with_nulls_nan_and_extra_keys_still_plots(tmp_path):
    body = rows({"accuracy": None, "new_key_from_a_later_version": [1, 2]},
                {"loss_after_prune": float("nan")})  # fmt: skip
    run = run_dir(tmp_path, body)
    metrics, records = read_run(run)
    assert [m["step"] for m in metrics] == [0, 1] and records == []
    assert [p.name for p in plot_run(run)] == ["loss_accuracy.png", "sparsity.png"]


# ------------------------------------------------------------------ through the CLI


def cli_error(capsys, *args) -> str:
    from prunekit.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("case", ["malformed JSON", "step is a string", "not UTF-8", "empty"])
def test_cli_plot_of_a_malformed_run(case, tmp_path, capsys):
    body, expected = CASES[case]
    run = run_dir(tmp_path, body)
    assert expected in cli_error(capsys, "plot", run)
    assert not (run / "plots").exists()


def test_cli_plot_of_a_missing_folder_and_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "plot", tmp_path / "nothere")
    assert not (tmp_path / "nothere").exists()
    line = cli_error(capsys, "plot", tmp_path)
    assert "no metrics.jsonl" in line and str(tmp_path) in line
    assert list(tmp_path.iterdir()) == []
