"""plot_run on a synthetic run directory: readable, non-empty PNGs written atomically."""

from __future__ import annotations

import json

import pytest

from prunekit.analysis import ntk_record, plot_run
from prunekit.errors import RunDirError

LAYERS = ("0.weight", "2.weight")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _metrics(steps=3, accuracy=True):
    rows = []
    for step in range(steps + 1):
        s = 1 - 0.5**step
        rows.append({
            "step": step, "sparsity": s, "per_layer": {n: s * (0.8 + 0.4 * k) / 1.2
                                                      for k, n in enumerate(LAYERS)},
            "loss_after_prune": 0.3 + 0.1 * step, "accuracy_after_prune": 0.9 - 0.05 * step
            if accuracy else None, "loss_after_finetune": 0.3 + 0.02 * step,
            "accuracy": 0.9 - 0.01 * step if accuracy else None, "seconds": 1.5,
            "ntk_alignment": 0.2 + 0.01 * step,
        })  # fmt: skip
    return rows


def _result(a):
    return {"alignment": a, "per_layer": {n: a * (k + 1) / 2 for k, n in enumerate(LAYERS)},
            "effective_rank": 4.0, "trace": 2.0}  # fmt: skip


def _ntk(steps=3):
    rows = [ntk_record(0, "dense", None, 0.0, _result(0.3), _result(0.2))]
    for step in range(1, steps + 1):
        s = 1 - 0.5**step
        rows.append(ntk_record(step, "prune", None, s, _result(0.25), _result(0.15)))
        for it in (0, 5, 6, 8, 20):
            rows.append(ntk_record(step, "finetune", it, s, _result(0.25 + it / 100), None))
    rows.append(ntk_record(steps, "final", None, 1 - 0.5**steps, _result(0.5), _result(0.3)))
    return rows


def _check_pngs(paths, names):
    import matplotlib.image

    assert sorted(p.name for p in paths) == sorted(names)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_plot_run_writes_all_plots(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", _metrics())
    _write_jsonl(tmp_path / "ntk.jsonl", _ntk())
    paths = plot_run(tmp_path)
    _check_pngs(paths, [
        "loss_accuracy.png", "sparsity.png", "ntk_alignment_steps.png",
        "ntk_alignment_finetune.png", "ntk_per_layer.png",
    ])  # fmt: skip
    assert all(p.parent == tmp_path / "plots" for p in paths)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)


def test_plot_run_without_ntk_or_accuracy_skips_those_plots(tmp_path, caplog):
    _write_jsonl(tmp_path / "metrics.jsonl", _metrics(accuracy=False))
    with caplog.at_level("INFO", logger="prunekit.analysis.plots"):
        paths = plot_run(str(tmp_path))
    _check_pngs(paths, ["loss_accuracy.png", "sparsity.png"])
    assert "NTK plots skipped" in caplog.text


def test_plot_run_errors_name_the_directory(tmp_path):
    with pytest.raises(RunDirError, match=f"{tmp_path}.*metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="no steps"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(RunDirError, match="line 2"):
        plot_run(tmp_path)


def test_many_layers_become_named_outliers_plus_a_band():
    from prunekit.analysis.plots import MAX_LAYER_LINES, _split_layers

    curves = {f"l{i}.weight": [0.0, 0.5 + i / 100] for i in range(30)}
    curves["odd.weight"] = [0.0, 0.05]  # the layer furthest from the global sparsity
    shown, rest = _split_layers(curves, overall=0.6)
    assert len(shown) == MAX_LAYER_LINES and len(rest) == 31 - MAX_LAYER_LINES
    assert "odd.weight" in shown and "l29.weight" in shown  # the two extremes are named
    assert "l10.weight" in rest  # 0.60: exactly the global value
    few = {k: curves[k] for k in list(curves)[:3]}
    assert _split_layers(few, 0.6) == (list(few), [])


def test_loss_plot_reads_the_final_finetune_from_the_report(tmp_path, monkeypatch):
    import prunekit.analysis.plots as plots

    _write_jsonl(tmp_path / "metrics.jsonl", _metrics())
    seen = []
    original = plots._plot_loss_accuracy
    monkeypatch.setattr(
        plots,
        "_plot_loss_accuracy",
        lambda m, o, final=None, note=None: seen.append(final) or original(m, o, final, note),
    )
    plot_run(tmp_path)
    (tmp_path / "report.json").write_text(
        json.dumps({"metrics": {"finetuned": {"loss": 0.25, "accuracy": 0.9}}})
    )
    plot_run(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    plot_run(tmp_path)  # a broken report only drops the final point
    assert seen == [None, {"loss": 0.25, "accuracy": 0.9}, None]
