"""The NTK log is off by default (issue 15): a run without ntk.jsonl says, under its
loss plot, how to turn the log on; a run with it does not."""

from __future__ import annotations

import json

from prunekit.analysis import ntk_record, plot_run


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _metrics():
    return [{"step": k, "sparsity": 0.5 * k, "loss_after_prune": 0.4, "loss_after_finetune": 0.3,
             "accuracy_after_prune": 0.8, "accuracy": 0.9} for k in range(3)]  # fmt: skip


def _ntk():
    result = {"alignment": 0.3, "per_layer": {"0.weight": 0.3}, "effective_rank": 2.0,
              "trace": 1.0}  # fmt: skip
    return [ntk_record(k, "final" if k == 2 else "dense", None, 0.5 * k, result, result)
            for k in range(3)]  # fmt: skip


def test_the_loss_plot_says_how_to_turn_the_ntk_log_on(tmp_path, monkeypatch):
    import prunekit.analysis.plots as plots

    notes = []
    original = plots._plot_loss_accuracy

    def spy(metrics, out, final=None, note=None):
        notes.append(note)
        return original(metrics, out, final, note)

    monkeypatch.setattr(plots, "_plot_loss_accuracy", spy)
    _write_jsonl(tmp_path / "metrics.jsonl", _metrics())
    paths = plot_run(tmp_path)
    assert notes[-1] == plots.NTK_OFF_NOTE and "--ntk" in notes[-1] and "off" in notes[-1]
    assert (tmp_path / "plots" / "loss_accuracy.png") in paths
    _write_jsonl(tmp_path / "ntk.jsonl", _ntk())
    plot_run(tmp_path)
    assert notes[-1] is None
