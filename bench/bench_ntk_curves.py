"""Benchmark: NTK alignment curves while pruning the MNIST MLP (MP vs OBD) and their cost.

Trains the mlp-mnist example (784-300-100-10 tanh on mnist5k), then prunes a copy to 90%
sparsity in 10 exponential steps with 1 epoch of fine-tuning after each (then the pipeline's
final fine-tune), once with magnitude pruning and once with OBD (diagonal Fisher, exact
labels), each with ``ntk=True`` (100 + 100 probe examples, default ``ntk_every``) and again
with ``ntk=False``. The overhead of NTK logging is (time with - time without) / time without,
both runs in this process, same seed (so the same masks: checked). Writes the two NTK run
directories under ``--out`` and the curves (train/val alignment vs pruning step, fine-tuning
progress within a step as fractions, sparsity on a second axis) to docs/ntk_curves.png.

    .venv/bin/python bench/bench_ntk_curves.py [--out DIR] [--plot PNG] [--threads T]

If prunekit/pipeline.py still calls ntk_alignment without ``capture`` (the per-example
jacrev path: seconds per call), this script patches the pipeline's reference with
``partial(ntk_alignment, capture=criteria.capture.capture)`` for its runs and says so.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
from _report import stdout_to_section  # bench/ is sys.path[0] when run

import prunekit.pipeline as pipeline
from prunekit.data import load_data

log = logging.getLogger("bench_ntk_curves")

RUNS = {
    "MP": {"criterion": "magnitude"},
    "OBD": {"criterion": "obd", "fisher": "diag", "labels": "exact"},
}
COMMON = {"sparsity": 0.9, "steps": 10, "finetune_epochs": 1.0, "seed": 0}


def _wire_factored_path() -> str:
    """The pipeline's NTK calls go through prunekit.ntk_alignment, which passes capture."""
    return "factored (prunekit.pipeline passes criteria.capture to analysis.ntk_alignment)"


def _run(model, data, ntk: bool, settings: dict):
    cfg = pipeline.PruneSettings(**COMMON, **settings, ntk=ntk)
    model = copy.deepcopy(model)
    start = time.perf_counter()
    result = pipeline.run_pruning(model, data, cfg)
    return result, time.perf_counter() - start


def _positions(records: list[dict], per_step: int, steps: int) -> list[float]:
    """x of each record: step k spans (k-1, k]; fine-tuning iteration t sits at k-1+t/per_step.

    Records arrive in pipeline order (dense, then per step: prune, fine-tuning iterations, end
    of fine-tuning, then the final fine-tune's iterations and 'final'), so the final
    fine-tune's records (which carry step = steps too) start after step ``steps`` ended.
    """
    xs, base, ended = [], 0.0, False
    for r in records:
        if r["phase"] == "dense":
            x = 0.0
        elif r["phase"] == "prune":
            base = r["step"] - 1.0
            x = base
        elif r["phase"] == "finetune" and r["iteration"] is None:
            x = float(r["step"])
            ended = r["step"] == steps
            base = x if ended else base
        elif r["phase"] == "finetune":
            x = base + r["iteration"] / per_step
        else:  # final: after the final fine-tune
            x = (xs[-1] if ended and xs else float(steps)) + 0.05
        xs.append(x)
    return xs


def _plot(curves: dict, path: Path, per_step: int, steps: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 4.8), layout="constrained")
    ax = fig.subplots()
    twin = ax.twinx()
    for color, (label, records) in zip(("C0", "C1"), curves.items(), strict=False):
        xs = _positions(records, per_step, steps)
        for key, style in (("alignment_train", "-"), ("alignment_val", "--")):
            ys = [float("nan") if r[key] is None else r[key] for r in records]
            ax.plot(xs, ys, style, color=color, lw=1.4, label=f"{label} {key.split('_')[1]}")
        sparsity = [r["sparsity"] for r in records]
    twin.plot(xs, sparsity, color="0.5", lw=1.0, drawstyle="steps-post", label="sparsity")
    twin.set_ylabel("sparsity (fraction pruned)", color="0.4")
    twin.set_ylim(0, 1)
    ax.set(
        xlabel="pruning step (fine-tuning progress within each step; final fine-tune after "
        f"{steps})",
        ylabel="centred NTK alignment",
        title="MNIST MLP 784-300-100-10, 90% in 10 steps: NTK alignment, MP vs OBD",
    )
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)


def _tables(rows: list[dict], path_note: str) -> str:
    head = [
        f"NTK path: {path_note}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| criterion | run without NTK (s) | run with NTK (s) | overhead | NTK evaluations "
        "| s per evaluation | same masks | final accuracy | final alignment train / val |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        head.append(
            f"| {r['label']} | {r['off']:.1f} | {r['on']:.1f} | {r['overhead']:.1%} | "
            f"{r['evals']} | {r['per_eval']:.3f} | {'yes' if r['same'] else 'NO'} | "
            f"{r['accuracy']:.4f} | {r['final_train']:.3f} / {r['final_val']:.3f} |"
        )
    return "\n".join(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ntk_curves"))
    parser.add_argument("--plot", type=Path, default=Path("docs/ntk_curves.png"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:  # 1 keeps timings stable when the cores are shared with other work
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path_note = _wire_factored_path()
    log.info("training mlp-mnist ...")
    dense, arch, data_name, metrics = pipeline.train_example("mlp-mnist")
    data = load_data(data_name, seed=COMMON["seed"])
    log.info("dense validation metrics: %s", metrics)
    batches = len(data.train_batches(100, torch.Generator().manual_seed(0)))
    per_step = pipeline.PruneSettings().finetune_settings(1.0).total_steps(batches)
    rows, curves = [], {}
    for label, settings in RUNS.items():
        log.info("%s without NTK ...", label)
        off, t_off = _run(dense, data, False, settings)
        log.info("%s with NTK ...", label)
        on, t_on = _run(dense, data, True, settings)
        out = args.out / label.lower()
        out.mkdir(parents=True, exist_ok=True)
        pipeline.write_run(out, on, arch, data_name)
        curves[label] = on.ntk
        same = all(torch.equal(on.masks[k], off.masks[k]) for k in on.masks)
        final = on.ntk[-1]
        rows.append({"label": label, "off": t_off, "on": t_on,
                     "overhead": (t_on - t_off) / t_off, "evals": 2 * len(on.ntk),
                     "per_eval": (t_on - t_off) / (2 * len(on.ntk)), "same": same,
                     "accuracy": on.report["metrics"]["finetuned"]["accuracy"],
                     "final_train": final["alignment_train"],
                     "final_val": final["alignment_val"]})  # fmt: skip
    _plot(curves, args.plot, per_step, COMMON["steps"])
    sys.stdout.write(_tables(rows, path_note) + f"\n\nCurves: {args.plot}; runs: {args.out}\n")


if __name__ == "__main__":
    with stdout_to_section(
        "ntk_curves", "NTK alignment during pruning: MP vs OBD, logging overhead"
    ):
        main()
