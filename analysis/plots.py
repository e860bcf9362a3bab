"""Plots of a run directory: metrics.jsonl (one line per pruning step) and ntk.jsonl.

Every figure is a PNG under run_dir/plots/, written atomically. NTK plots are skipped (and
the skip logged) when the run has no ntk.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from prunekit.analysis.probe import PHASES
from prunekit.errors import RunDirError

_UMASK = os.umask(0)
os.umask(_UMASK)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
NTK_FILE = "ntk.jsonl"
PLOTS_DIR = "plots"
#: drawn under loss_accuracy.png when the run has no ntk.jsonl (the log is off by default)
NTK_OFF_NOTE = (
    "NTK alignment not logged (off by default: it can cost several times the run); "
    "rerun with --ntk (recipe: analysis.ntk: true) to plot it"
)


# What each line must hold: key -> (required?, allowed types). Numbers may be null (not
# measured) or NaN; unknown keys are ignored, so newer runs still plot.
_NUMBER = (int, float, type(None))
_METRICS_SCHEMA = {
    "step": (True, (int,)),
    "sparsity": (True, _NUMBER),
    "loss_after_prune": (True, _NUMBER),
    "loss_after_finetune": (True, _NUMBER),
    "accuracy_after_prune": (False, _NUMBER),
    "accuracy": (False, _NUMBER),
    "cosine_after_prune": (False, _NUMBER),
    "cosine": (False, _NUMBER),
    "per_layer": (False, (dict, type(None))),
}
_NTK_SCHEMA = {
    "step": (True, (int,)),
    "phase": (True, (str,)),
    "iteration": (False, (int, type(None))),
    "sparsity": (False, _NUMBER),
    "alignment_train": (False, _NUMBER),
    "alignment_val": (False, _NUMBER),
    "per_layer_train": (False, (dict, type(None))),
}


def _is(value, types: tuple) -> bool:
    """isinstance, except that JSON true/false are not numbers."""
    return isinstance(value, types) and not isinstance(value, bool)


def _type_names(types: tuple) -> str:
    """'an integer', 'a number or null', ... for messages."""
    names = {int: "integer", float: "number", str: "string", dict: "object", type(None): "null"}
    if float in types:
        types = tuple(t for t in types if t is not int)  # 'number' covers integers
    text = " or ".join(names[t] for t in types)
    return ("an " if text[0] in "aeiou" else "a ") + text


def _check_row(row: dict, schema: dict, where: str) -> None:
    """RunDirError naming the line and key when ``row`` lacks a key or has a wrong type."""
    for key, (required, types) in schema.items():
        if key not in row:
            if required:
                raise RunDirError(f"{where} lacks the key {key!r} (a prunekit run has it)")
            continue
        value = row[key]
        if not _is(value, types):
            raise RunDirError(
                f"{where}: {key!r} is {json.dumps(value)[:40]}, not {_type_names(types)}"
            )
        if isinstance(value, dict) and not all(_is(v, _NUMBER) for v in value.values()):
            raise RunDirError(f"{where}: {key!r} must map layer names to numbers or null")
    if row["step"] < 0:
        raise RunDirError(f"{where}: 'step' is {row['step']}, not a step number >= 0")
    if "phase" in schema and row["phase"] not in PHASES:
        raise RunDirError(f"{where}: 'phase' is {row['phase']!r}, not one of {', '.join(PHASES)}")


def _read_jsonl(path: Path, schema: dict) -> list[dict]:
    """Parsed, checked lines of a JSON-lines file (blank lines skipped).

    RunDirError (one line naming the file and line number) for a file that cannot be read
    or is not UTF-8, a line that is not a JSON object, or a line ``schema`` refuses.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RunDirError(f"{path}: cannot read ({err.strerror or err})") from None
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}: line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise RunDirError(f"{where} is not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise RunDirError(f"{where} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{where} is not a JSON object")
        rows.append((where, row))
    for where, row in rows:  # syntax first: a broken line outranks a key lacking earlier
        _check_row(row, schema, where)
    return [row for _, row in rows]


def _value(value) -> float:
    """Float for plotting: None (not measured / undefined) becomes NaN (a gap in the line)."""
    return math.nan if value is None else float(value)


def _save(fig, path: Path) -> Path:
    """Render ``fig`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    except OSError as err:  # a read-only run directory, a full disk
        raise RunDirError(f"cannot write {path} ({err.strerror or err})") from None
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * ncols, 4.2), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plot_loss_accuracy(
    metrics: list[dict], out: Path, final: dict | None = None, note: str | None = None
) -> Path:
    """Loss (and accuracy / cosine) after prune and after fine-tuning per step; ``final``
    (report.json's metrics.finetuned) is drawn as a star half a step after the last one;
    ``note``, if any, is written under the panels."""
    steps = [m["step"] for m in metrics]
    panels = [("loss", "Loss", "loss_after_prune", "loss_after_finetune")]
    for key, title in (("accuracy", "Accuracy"), ("cosine", "Cosine similarity to dense")):
        if any(m.get(key) is not None for m in metrics):  # cosine: distillation runs
            panels.append((key, title, f"{key}_after_prune", key))
    fig, axes = _figure(len(panels))
    for ax, (ylabel, title, pruned, tuned) in zip(axes, panels, strict=True):
        for key, label in ((pruned, "after prune"), (tuned, "after FT")):
            ax.plot(steps, [_value(m.get(key)) for m in metrics], marker="o", label=label)
        value = (final or {}).get(ylabel)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ax.plot([steps[-1] + 0.5], [value], "k*", markersize=12, label="final FT")
        ax.set(xlabel="pruning step (0 = dense)", ylabel=ylabel, title=title)
        ax.legend()
    if note:
        fig.supxlabel(note, fontsize=7, color="0.35")
    return _save(fig, out / "loss_accuracy.png")


#: Layers drawn one line each; with more, the rest become one band (min..max) so the legend
#: never covers the figure and colours never repeat.
MAX_LAYER_LINES = 8


def _plot_sparsity(metrics: list[dict], out: Path) -> Path:
    """Per-layer and global fraction pruned vs step: the MAX_LAYER_LINES layers furthest from
    the global sparsity at the end as lines, every other layer inside a grey band."""
    fig, (ax,) = _figure()
    steps = [m["step"] for m in metrics]
    names = list(dict.fromkeys(n for m in metrics for n in (m.get("per_layer") or {})))
    curves = {
        n: [_value((m.get("per_layer") or {}).get(n)) for m in metrics] for n in names
    }
    overall = [_value(m.get("sparsity")) for m in metrics]
    shown, rest = _split_layers(curves, overall[-1])
    colours = matplotlib_colours(len(shown))
    for name, colour in zip(shown, colours, strict=True):
        ax.plot(steps, curves[name], color=colour, label=name)
    if rest:
        low = [min(curves[n][i] for n in rest) for i in range(len(steps))]
        high = [max(curves[n][i] for n in rest) for i in range(len(steps))]
        ax.fill_between(steps, low, high, color="0.6", alpha=0.35, label=f"{len(rest)} others")
    ax.plot(steps, overall, "k--", lw=2, label="global")
    ax.set(xlabel="pruning step (0 = dense)", ylabel="fraction pruned", title="Sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "sparsity.png")


def _split_layers(curves: dict[str, list[float]], overall: float) -> tuple[list, list]:
    """(layers drawn as lines, layers in the band): the ones whose final sparsity is furthest
    from the global value are the ones worth naming."""
    if len(curves) <= MAX_LAYER_LINES:
        return list(curves), []
    def distance(name: str) -> float:
        last = curves[name][-1]
        return abs(last - overall) if last == last else -1.0  # NaN (never pruned) last
    ranked = sorted(curves, key=distance, reverse=True)
    shown = set(ranked[:MAX_LAYER_LINES])
    return [n for n in curves if n in shown], [n for n in curves if n not in shown]


def matplotlib_colours(count: int) -> list:
    """``count`` distinct colours (tab10, then tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _milestones(records: list[dict]) -> list[dict]:
    """Records at step boundaries: dense, after each prune, end of each fine-tune, final."""
    last_ft: dict[int, dict] = {}
    for r in records:
        if r.get("phase") == "finetune":
            best = last_ft.get(r["step"])
            if best is None or (r.get("iteration") or 0) >= (best.get("iteration") or 0):
                last_ft[r["step"]] = r
    keep = [r for r in records if r.get("phase") in ("dense", "prune", "final")]
    keep += list(last_ft.values())
    order = {"dense": 0, "prune": 1, "finetune": 2, "final": 3}
    return sorted(keep, key=lambda r: (r["step"], order.get(r.get("phase"), 4)))


# Where a milestone sits on the step axis: fine-tuning results half a step after the pruning.
_OFFSET = {"dense": 0.0, "prune": 0.0, "finetune": 0.5, "final": 0.75}


def _plot_alignment_steps(records: list[dict], metrics: list[dict], out: Path) -> Path:
    fig, (ax,) = _figure()
    marks = _milestones(records)
    for key, style, label in (("alignment_train", "C0-o", "train probe"),
                              ("alignment_val", "C0--s", "val probe")):  # fmt: skip
        # Drop unmeasured points so each line stays connected across them.
        pts = [(r["step"] + _OFFSET.get(r.get("phase"), 0.0), _value(r.get(key))) for r in marks]
        pts = [(x, v) for x, v in pts if not math.isnan(v)]
        ax.plot([x for x, _ in pts], [v for _, v in pts], style, label=label)
    ax.set(xlabel="pruning step (+0.5 = after its fine-tuning)", ylabel="NTK alignment")
    ax.set_title("Tangent-kernel alignment while pruning")
    twin = ax.twinx()
    twin.plot(
        [m["step"] for m in metrics],
        [_value(m.get("sparsity")) for m in metrics],
        "C3:",
        lw=1.5,
        label="sparsity",
    )
    twin.set_ylabel("sparsity (fraction pruned)", color="C3")
    twin.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best", fontsize="small")
    return _save(fig, out / "ntk_alignment_steps.png")


def _plot_alignment_iterations(records: list[dict], out: Path) -> Path:
    from matplotlib import colormaps

    fig, (ax,) = _figure()
    by_step: dict[int, list[dict]] = {}
    for r in records:
        if r.get("phase") == "finetune" and r.get("iteration") is not None:
            by_step.setdefault(r["step"], []).append(r)
    cmap = colormaps["viridis"]
    for k, (step, rows) in enumerate(sorted(by_step.items())):
        rows = sorted(rows, key=lambda r: r["iteration"])
        colour = cmap(k / max(len(by_step) - 1, 1))
        its = [r["iteration"] for r in rows]
        ax.plot(
            its,
            [_value(r.get("alignment_train")) for r in rows],
            "-",
            color=colour,
            label=f"step {step}",
        )
        ax.plot(its, [_value(r.get("alignment_val")) for r in rows], "--", color=colour)
    # symlog keeps iteration 0 on a log-like axis (the paper plots log iterations).
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(xlabel="fine-tuning iteration", ylabel="NTK alignment")
    ax.set_title("Alignment during fine-tuning (solid: train, dashed: val)")
    if by_step:
        ax.legend(fontsize="small", ncol=2)
    return _save(fig, out / "ntk_alignment_finetune.png")


def _plot_per_layer_heatmap(records: list[dict], out: Path) -> Path:
    import numpy as np

    marks = _milestones(records)
    names = list(dict.fromkeys(n for r in marks for n in (r.get("per_layer_train") or {})))
    grid = np.array(
        [[_value((r.get("per_layer_train") or {}).get(n)) for r in marks] for n in names]
    ).reshape(len(names), len(marks))
    fig, (ax,) = _figure()
    image = ax.imshow(
        np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="alignment of the layer's kernel (train probe)")
    short = {"dense": "d", "prune": "p", "finetune": "f", "final": "F"}
    labels = [f"{r['step']}{short.get(r.get('phase'), '?')}" for r in marks]
    stride = max(1, len(labels) // 20)  # keep tick labels legible on long runs
    ax.set_xticks(range(0, len(labels), stride), labels[::stride], rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="step + phase (d dense, p pruned, f fine-tuned, F final)")
    ax.set_title("Per-layer NTK alignment")
    return _save(fig, out / "ntk_per_layer.png")


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's plots to run_dir/plots/ and return their paths (PNG, Agg backend).

    Always: loss_accuracy.png (loss, and accuracy / cosine similarity to the dense model
    when measured, after prune and after fine-tuning, vs step) and sparsity.png (per-layer
    and global fraction pruned vs step).
    With ntk.jsonl: ntk_alignment_steps.png (train/val alignment vs step, sparsity on a
    second axis), ntk_alignment_finetune.png (alignment vs fine-tuning iteration, one line
    per step, only when records inside fine-tuning exist) and ntk_per_layer.png (heat map,
    layer x milestone). Without ntk.jsonl those are skipped, the skip is logged and
    loss_accuracy.png says how to turn the log on (``NTK_OFF_NOTE``). Raises
    RunDirError (see :func:`read_run`) before writing anything when the run's files are
    missing or malformed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    run_dir = Path(run_dir)
    metrics, records = read_run(run_dir)
    out = run_dir / PLOTS_DIR
    try:
        out.mkdir(exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create {out} ({err.strerror or err})") from None
    final = _final_metrics(run_dir)
    note = None if records else NTK_OFF_NOTE
    written = [_plot_loss_accuracy(metrics, out, final, note), _plot_sparsity(metrics, out)]
    if not records:
        log.info("%s: no NTK records in %s; NTK plots skipped", run_dir, NTK_FILE)
        return written
    written.append(_plot_alignment_steps(records, metrics, out))
    inside = [r for r in records if r.get("phase") == "finetune" and r.get("iteration")]
    if inside:
        written.append(_plot_alignment_iterations(records, out))
    else:  # an empty chart says nothing: only when --ntk-every logged inside fine-tuning
        (out / "ntk_alignment_finetune.png").unlink(missing_ok=True)
        log.info("%s: no NTK records inside fine-tuning (--ntk-every none); plot skipped", run_dir)
    written.append(_plot_per_layer_heatmap(records, out))
    log.info("%s: wrote %d plots to %s", run_dir, len(written), out)
    return written


def _final_metrics(run_dir: Path) -> dict | None:
    """report.json's metrics after the final fine-tune, or None when the run has no readable
    report (plots of a run still being written draw without the final point)."""
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        final = report["metrics"]["finetuned"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return final if isinstance(final, dict) else None


def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(metrics rows sorted by step, NTK records) of a run directory, checked before any
    plot is drawn: RunDirError (one line naming the folder, or the file and line) for a
    missing folder, a folder without metrics.jsonl, or a malformed metrics.jsonl/ntk.jsonl
    (not UTF-8, not JSON objects, missing keys, wrong value types, no steps)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise RunDirError(f"{str(run_dir)!r} is a file, not a run directory")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RunDirError(
            f"{run_dir}: no {METRICS_FILE}, so not a prunekit run directory (a run holds "
            f"{METRICS_FILE} and report.json)"
        )
    metrics = sorted(_read_jsonl(metrics_path, _METRICS_SCHEMA), key=lambda m: m["step"])
    if not metrics:
        raise RunDirError(f"{metrics_path}: holds no steps")
    ntk_path = run_dir / NTK_FILE
    records = _read_jsonl(ntk_path, _NTK_SCHEMA) if ntk_path.is_file() else []
    return metrics, records
