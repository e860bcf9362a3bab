"""Pruning quality with fine-tuning on the paper's MNIST MLP (issue 16), side by side.

The 784-300-100-10 tanh MLP (`prunekit example mlp-mnist` training) on mnist5k (4,000 train
/ 1,000 validation), pruned to 90% and to the paper's 98.85% (1 - 0.8^20) by every mode
that exists in this checkout, each row with exactly 20 epochs of fine-tuning in total
(between-step epochs x steps + final epochs): torch's global L1 (one shot + 20 epochs),
gradual magnitude ("GMP": 10 steps, 1 epoch between, 10 final), the paper's protocol (14
steps, no fine-tuning between, 20 final), EKFAC OBD both ways, OBS with the summed update,
and the issue-16 modes (joint OBS update, multi-shot steps, SparseGPT, Wanda, distillation
from the dense model, cosine schedule per phase) as soon as PruneSettings / the criteria
registry have them (a missing one is listed as not available; a failing one as failed,
with its error). Prints the best mode and the issue's GOAL lines.

``--budget default`` instead compares, at 90%, the CLI defaults' budget (steps 10,
finetune_epochs 1, final_epochs 2, lr auto) of the default settings against GMP and the new
modes at that same budget.

    .venv/bin/python bench/bench_quality.py [--budget default] [--seeds N] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.utils.prune as torch_prune
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import train_example
from prunekit.criteria import CRITERIA
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import make_task

PAPER_SPARSITY = 1 - 0.8**20  # 0.98847
SPARSITIES = (0.9, PAPER_SPARSITY)
TOTAL_EPOCHS = 20
LR, BATCH = 0.01, 100
FIELDS = {f.name for f in fields(PruneSettings)}

# protocols: (steps, finetune_epochs between steps, final_epochs); each totals 20 epochs
ONE_SHOT = (1, 0.0, 20.0)
PAPER = (14, 0.0, 20.0)
GRADUAL = (10, 1.0, 10.0)


@dataclass(frozen=True)
class Mode:
    """One row: a label, PruneSettings overrides and a protocol (steps, between, final)."""

    label: str
    settings: dict = field(default_factory=dict)
    protocol: tuple = GRADUAL
    base: str | None = None  # the row this one varies (fine-tuning variants)

    def missing(self) -> list[str]:
        """What this checkout lacks for the mode (unknown settings or criterion)."""
        out = [k for k in self.settings if k not in FIELDS]
        crit = self.settings.get("criterion")
        if crit is not None and crit not in CRITERIA:
            out.append(f"criterion {crit!r}")
        return out


def summed_update() -> dict:
    """The summed single-weight OBS update: `update='summed'` once it exists, else the
    historical `compensate=True` (the same thing)."""
    return {"update": "summed"} if "update" in FIELDS else {"compensate": True}


def ft_variants(label: str, settings: dict, protocol=GRADUAL, only=None) -> list[Mode]:
    """The mode plain, with distillation (weight 0.5, 1.0) and with the cosine schedule
    (``only``: the variants' tails to keep, None = all; the slow modes get fewer)."""
    variants = [
        (" + distill 0.5", {"distill_weight": 0.5}),
        (" + distill 1.0", {"distill_weight": 1.0}),
        (" + cosine", {"lr_schedule": "cosine"}),
        (" + distill 0.5 + cosine", {"distill_weight": 0.5, "lr_schedule": "cosine"}),
    ]
    return [Mode(label, settings, protocol)] + [
        Mode(label + tail, {**settings, **extra}, protocol, base=label)
        for tail, extra in variants
        if only is None or tail in only
    ]


GMP_LABEL = "GMP: magnitude, 10 steps, FT between"
DEFAULT_LABEL = "obd, EKFAC (default), 14 steps then FT"


def modes() -> list[Mode]:
    """Every row of the main table (torch's L1 row is added separately)."""
    obd_diag = {"criterion": "obd", "fisher": "diag", "labels": "exact"}
    out = [
        *ft_variants(GMP_LABEL, {"criterion": "magnitude"}),
        Mode("obd, exact diag, 14 steps then FT (paper)", obd_diag, PAPER),
        Mode(DEFAULT_LABEL, {"criterion": "obd"}, PAPER),
        *ft_variants("obd, EKFAC, 10 steps, FT between", {"criterion": "obd"}),
        Mode("obd, exact diag, 10 steps, FT between", obd_diag),
        Mode("obs + summed update, 10 steps, FT between", {"criterion": "obs", **summed_update()}),
        Mode("obd + joint update, 10 steps", {"criterion": "obd", "update": "joint"}),
        *ft_variants(
            "obs + joint update, 10 steps",
            {"criterion": "obs", "update": "joint"},
            only=(" + distill 0.5", " + distill 1.0"),
        ),
        Mode("obd, shots 4, 10 steps", {"criterion": "obd", "shots": 4}),
        Mode(
            "obs + joint update, 1 step then FT", {"criterion": "obs", "update": "joint"}, ONE_SHOT
        ),
        Mode("sparsegpt, 1 step then FT", {"criterion": "sparsegpt"}, ONE_SHOT),
        *ft_variants("sparsegpt, 10 steps", {"criterion": "sparsegpt"}),
        Mode("wanda, 1 step then FT", {"criterion": "wanda"}, ONE_SHOT),
        *ft_variants("wanda, 10 steps", {"criterion": "wanda"}),
    ]
    return out


def default_budget_modes() -> list[Mode]:
    """The `--budget default` rows: the CLI defaults' budget (steps 10, 1 epoch between,
    2 final), every row at lr 'auto' like the CLI."""
    budget = (10, 1.0, 2.0)
    rows = [
        Mode("obd, EKFAC (the default before `auto`)", {"criterion": "obd"}, budget),
        Mode("GMP: magnitude at the same budget", {"criterion": "magnitude"}, budget),
        Mode("obd, exact diag", {"criterion": "obd", "fisher": "diag", "labels": "exact"}, budget),
        Mode("obs + summed update", {"criterion": "obs", **summed_update()}, budget),
        Mode("obd + joint update", {"criterion": "obd", "update": "joint"}, budget),
        Mode("obs + joint update", {"criterion": "obs", "update": "joint"}, budget),
        Mode("obs + joint, shots 4", {"criterion": "obs", "update": "joint", "shots": 4}, budget),
        Mode("sparsegpt", {"criterion": "sparsegpt"}, budget),
        Mode("wanda", {"criterion": "wanda"}, budget),
        Mode("obd + rows update", {"criterion": "obd", "update": "rows"}, budget),
        Mode("obs + rows update", {"criterion": "obs", "update": "rows"}, budget),
    ]
    extra = []
    for m in rows[:2] + rows[4:6] + rows[7:8]:
        for tail, more in ((" + distill 0.5", {"distill_weight": 0.5}),
                           (" + cosine", {"lr_schedule": "cosine"})):  # fmt: skip
            extra.append(Mode(m.label + tail, {**m.settings, **more}, budget, base=m.label))
    return rows + extra


def run_mode(dense, data, mode: Mode, sparsity: float, seed: int, lr, scale: float) -> dict:
    """Prune a copy of ``dense`` with ``mode``; accuracies (after prune, after FT), seconds."""
    steps, between, final = mode.protocol
    steps = max(1, round(steps * scale)) if scale < 1 else steps
    kw = dict(
        sparsity=sparsity, steps=steps, finetune_epochs=between * scale, final_epochs=final * scale,
        lr=lr, batch_size=BATCH, seed=seed, ntk=False,
    )  # fmt: skip
    settings = PruneSettings(**{**kw, **mode.settings})
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    report = run_pruning(model, data, settings).report
    m = report["metrics"]
    return {
        "pruned": m["pruned"]["accuracy"],
        "tuned": m["finetuned"]["accuracy"],
        "seconds": time.perf_counter() - t0,
        "sparsity": report["sparsity"]["global"],
    }


def torch_l1(dense, data, sparsity: float, seed: int, scale: float) -> dict:
    """torch.nn.utils.prune global L1 in one shot, then 20 epochs of the same SGD."""
    task = make_task(data.kind)
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=sparsity)
    pruned = evaluate(model, task, data.val_batches())
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    phase = FinetuneSettings(epochs=TOTAL_EPOCHS * scale, lr=LR)  # sgd, momentum .9, wd 5e-4
    finetune(model, task, data.train_batches(BATCH, gen), phase)  # the forward hooks mask
    for module, name in params:
        torch_prune.remove(module, name)
    tuned = evaluate(model, task, data.val_batches())
    return {
        "pruned": pruned["accuracy"],
        "tuned": tuned["accuracy"],
        "seconds": time.perf_counter() - t0,
        "sparsity": sparsity,
    }


def measure(fn, seeds: int) -> dict:
    """Mean over seeds of fn(seed)'s numbers (plus the per-seed tuned accuracies), or
    {'error': first line} when it raises."""
    runs = []
    for seed in range(seeds):
        try:
            runs.append(fn(seed))
        except Exception as exc:  # a mode under construction: report it, keep going
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
    out["all"] = [r["tuned"] for r in runs]
    return out


def fmt_acc(r: dict | None, key: str) -> str:
    if r is None:
        return "n/a"
    if "error" in r:
        return "failed"
    return f"{100 * r[key]:.2f}"


def run_table(dense, data, rows: list[Mode], sparsities, seeds: int, lr, scale: float, l1: bool):
    """{(label, sparsity): result or None (mode not available)} for every row, in order."""
    results: dict = {}
    labels = (["torch global L1, one shot + 20 epochs"] if l1 else []) + [m.label for m in rows]
    for s in sparsities:
        if l1:
            results[(labels[0], s)] = measure(
                lambda seed, s=s: torch_l1(dense, data, s, seed, scale), seeds
            )
            progress(labels[0], s, results[(labels[0], s)])
        for m in rows:
            if m.missing():
                results[(m.label, s)] = None
                continue

            def one(seed, m=m, s=s):
                return run_mode(dense, data, m, s, seed, lr, scale)

            results[(m.label, s)] = measure(one, seeds)
            progress(m.label, s, results[(m.label, s)])
    return labels, results


def progress(label: str, s: float, r: dict) -> None:
    text = (
        r.get("error")
        or f"pruned {fmt_acc(r, 'pruned')} tuned {fmt_acc(r, 'tuned')} {r['seconds']:.1f} s"
    )
    print(f"  [{s:.4f}] {label}: {text}", file=sys.stderr, flush=True)


def table_rows(labels, results, sparsities, rows: list[Mode]) -> tuple[list, list, list]:
    """(table rows, failed lines, not-available lines)."""
    by_label = {m.label: m for m in rows}
    out, failed, missing = [], [], []
    for label in labels:
        rs = [results[(label, s)] for s in sparsities]
        if all(r is None for r in rs):
            missing.append(f"- {label}: needs {', '.join(by_label[label].missing())}")
            continue
        for s, r in zip(sparsities, rs, strict=True):
            if r is not None and "error" in r:
                failed.append(
                    f"- {label} at {s:.4f}: `{r['error']}` (settings "
                    f"{by_label[label].settings}, protocol {by_label[label].protocol})"
                )
        base = by_label[label].base if label in by_label else None
        if base and all(
            r and b and "error" not in r and "error" not in b
            and (r["pruned"], r["tuned"]) == (b["pruned"], b["tuned"])
            for r, b in zip(rs, [results.get((base, s)) for s in sparsities], strict=True)
        ):  # fmt: skip
            label += " (= its base row: the setting changed nothing?)"
        secs = " / ".join(f"{r['seconds']:.0f}" if r and "error" not in r else "-" for r in rs)
        out.append(
            [label]
            + [fmt_acc(r, "tuned") for r in rs]
            + [fmt_acc(r, "pruned") for r in rs]
            + [secs]
        )
    return out, failed, missing


def best(labels, results, s: float, exclude=()) -> tuple[str, float] | None:
    ok = [
        (results[(lb, s)]["tuned"], lb)
        for lb in labels
        if lb not in exclude and results[(lb, s)] and "error" not in results[(lb, s)]
    ]
    if not ok:
        return None
    acc, lb = max(ok)
    return lb, acc


def goal(text: str, value: float, bound: float) -> str:
    state = "MET" if value >= bound else "MISSED"
    return (
        f"- GOAL {state}: {text}: {100 * value:.2f} vs required >= {100 * bound:.2f} "
        f"({100 * (value - bound):+.2f} points)"
    )


def report_main(args, dense_metrics, labels, results, rows, seeds) -> str:
    sp = SPARSITIES
    table, failed, missing = table_rows(labels, results, sp, rows)
    headers = ["method", "acc after FT 90%", "acc after FT 98.85%", "acc after prune 90%",
               "acc after prune 98.85%", "seconds 90% / 98.85%"]  # fmt: skip
    dense = dense_metrics["accuracy"]
    lines = [
        f"Dense 784-300-100-10 tanh MLP (`train_example('mlp-mnist', seed=0)`: 15 epochs SGD lr "
        f"0.1 cosine) on mnist5k, 4,000 train / 1,000 validation: validation accuracy "
        f"{100 * dense:.2f}%, loss {dense_metrics['loss']:.4f}. Every row: exactly "
        f"{TOTAL_EPOCHS} epochs of fine-tuning in total (steps x between-step epochs + final "
        f"epochs), SGD lr {LR} (momentum 0.9, wd 5e-4, batch {BATCH}; constant unless the row "
        "says cosine = warm restart + cosine decay per phase), scores from the first 1,000 "
        "training examples, prunekit's best-of-phase guard on (prunekit rows). 'distill w' = "
        "fine-tuning loss (1-w) task + w KL to the dense model. GMP = 10 steps, 1 epoch "
        "between, 10 final; 14-step rows: no fine-tuning between, 20 final; 1-step rows: 20 "
        f"final. Accuracies in % on the validation split; {seeds} seed(s) per row "
        "(pruning/fine-tuning seed; the dense model is the same), mean shown.\n",
        markdown_table(headers, table),
    ]
    gmp = results.get((GMP_LABEL, sp[1]))
    b90, b98 = best(labels, results, sp[0]), best(labels, results, sp[1])
    lines.append("")
    if b90:
        lines.append(f"Best mode at 90%: **{b90[0]}** ({100 * b90[1]:.2f}%).")
    if b98:
        lines.append(f"Best mode at 98.85%: **{b98[0]}** ({100 * b98[1]:.2f}%).\n")
    if b98 and gmp and "error" not in gmp:
        lines.append(goal(f"98.85% best ({b98[0]}) >= dense - 1.0", b98[1], dense - 0.01))
        lines.append(goal(f"98.85% best ({b98[0]}) >= GMP + 1.5 (GMP {100 * gmp['tuned']:.2f})",
                          b98[1], gmp["tuned"] + 0.015))  # fmt: skip
    if b90:
        lines.append(goal(f"90% best ({b90[0]}) >= dense - 0.2", b90[1], dense - 0.002))
    d98 = results.get((DEFAULT_LABEL, sp[1]))
    if d98 and "error" not in d98 and gmp and "error" not in gmp:
        lines.append(
            f"- default obd (EKFAC, 14 steps then FT) at 98.85%: {100 * d98['tuned']:.2f} vs "
            f"GMP {100 * gmp['tuned']:.2f} ({100 * (d98['tuned'] - gmp['tuned']):+.2f} points)"
        )
    if seeds > 1 and b98 and gmp and "error" not in gmp:
        lines.append("\nPer-seed accuracy after FT at 98.85% of the best and GMP: "
                     f"{b98[0]} {[round(100 * a, 2) for a in results[(b98[0], sp[1])]['all']]}, "
                     f"GMP {[round(100 * a, 2) for a in gmp['all']]}.")  # fmt: skip
    lines.append("\nModes that failed:\n\n" + ("\n".join(failed) if failed else "- none"))
    lines.append("\nModes not available in this checkout (rows left out):\n\n"
                 + ("\n".join(missing) if missing else "- none"))  # fmt: skip
    return "\n".join(lines)


def report_default(dense_metrics, labels, results, rows, seeds) -> str:
    s = SPARSITIES[0]
    table, failed, missing = table_rows(labels, results, (s,), rows)
    lines = [
        f"Same dense model (validation accuracy {100 * dense_metrics['accuracy']:.2f}%), 90% "
        "sparsity, the budget of the CLI defaults: steps 10, finetune_epochs 1, final_epochs "
        "2 (12 epochs of fine-tuning), lr 'auto' (probed once), every other setting its "
        f"default unless the row names it. {seeds} seed(s), mean shown.\n",
        markdown_table(["method", "acc after FT 90%", "acc after prune 90%", "seconds"], table),
        "",
    ]
    d, g = results.get((rows[0].label, s)), results.get((rows[1].label, s))
    b = best(labels, results, s)
    if d and g and "error" not in d and "error" not in g:
        lines.append(
            f"- defaults vs GMP at this budget: {100 * d['tuned']:.2f} vs "
            f"{100 * g['tuned']:.2f} ({100 * (d['tuned'] - g['tuned']):+.2f} points)"
        )
    if b:
        lines.append(f"- best mode at this budget: **{b[0]}** ({100 * b[1]:.2f}%)")
    lines.append("\nModes that failed:\n\n" + ("\n".join(failed) if failed else "- none"))
    lines.append("\nModes not available in this checkout (rows left out):\n\n"
                 + ("\n".join(missing) if missing else "- none"))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", choices=("paper", "default"), default="paper",
        help="paper: 20 epochs per row (default); default: the CLI budget",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="pruning/fine-tuning seeds per row")
    parser.add_argument("--quick", action="store_true", help="1/10 of the epochs, writes nothing")
    parser.add_argument("--only", default="", help="|-separated label substrings (debug)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    t0 = time.perf_counter()
    dense, _arch, data_name, dense_metrics = train_example("mlp-mnist", seed=0)
    data = load_data(data_name, seed=0)
    print(f"dense: {dense_metrics}", file=sys.stderr, flush=True)
    rows = modes() if args.budget == "paper" else default_budget_modes()
    if args.only:
        keys = args.only.split("|")
        rows = [m for m in rows if any(k in m.label for k in keys)]
    if args.budget == "paper":
        labels, results = run_table(dense, data, rows, SPARSITIES, args.seeds, LR, scale, True)
        body = report_main(args, dense_metrics, labels, results, rows, args.seeds)
        name, title = "quality", "Pruning quality with fine-tuning: MNIST MLP, 20 epochs per row"
    else:
        labels, results = run_table(
            dense, data, rows, SPARSITIES[:1], args.seeds, "auto", scale, False
        )
        body = report_default(dense_metrics, labels, results, rows, args.seeds)
        name, title = (
            "quality_default",
            "Pruning quality at the CLI defaults' budget: MNIST MLP, 90%",
        )
    body += f"\n\nTotal bench runtime: {time.perf_counter() - t0:.0f} s."
    print(body)
    if args.quick or args.only:
        print("(quick/only run: BENCHMARKS.md not written)")
        return
    cmd = "python bench/bench_quality.py" + " ".join(
        [""] + (["--budget default"] if args.budget == "default" else [])
        + ([f"--seeds {args.seeds}"] if args.seeds != 1 else []))  # fmt: skip
    update_section(name, title, cmd, body)
    print(f"wrote BENCHMARKS.md section {name}")


if __name__ == "__main__":
    main()
