"""Benchmark of structured ('units') pruning: accuracy after the same fine-tuning budget per
group criterion, and onnxruntime latency of the shrunk export vs the dense export.

Models: the MNIST MLP 784-300-100-10 (tanh) and the MNIST CNN with BatchNorm
(``prunekit.models.cnn(bn=1)``: conv16-BN-relu-pool, conv32-BN-relu-pool, fc64, fc10), both
trained here on mnist5k (4000 train / 1000 val, seed 0; AdamW 1e-3, 20 and 8 epochs), and
the MiniLM-sized encoder (``prunekit.models.encoder(vocab=4096, dim=384, heads=6, layers=6,
ffn=1536)``, random weights, latency only; units by group-L2, the same fraction of every
group: scope 'layer').

Accuracy rows: at 25/50/75% of units removed, each criterion prunes in 3 steps (exp
schedule), every step followed by BatchNorm recalibration (CNN) and 0.5 epoch of masked SGD
fine-tuning (lr 0.01, momentum 0.9, wd 5e-4, batch 100), then 1 final epoch: the same budget
and batches for every row; as in prunekit's loop, a phase that ends with a higher validation
loss hands back its starting weights. Criteria: prunekit's group L2, group Taylor and
Fisher group quadratic (obd, EKFAC, 1000 scoring examples, sampled labels) with scope 'global', the
Fisher criterion with scope 'layer' too, structured OBS (KFAC; the consumers' remaining
columns get the OBS update), and the peer rows: our reimplementation of
Torch-Pruning's GroupNormImportance (p=2) and GroupTaylorImportance (defaults: per member
sum of |w|^2 or |w*grad| over the unit's entries, biases excluded, 'mean' over members, then
divided by the group's mean; TP's Taylor matches BatchNorm against its GroupNorm handler,
so BN members do not count there, as in their code), pruned with Torch-Pruning's default
uniform per-layer ratio (scope 'layer').

Latency: ONNX exports (prunekit.export, storage 'dense', verified against PyTorch) of the
dense model and of the shrunk model (``prunekit.units.shrink_result``), onnxruntime CPU
with 1 and 2 intra-op threads (spinning off), batch 1 and 64, p50 over interleaved runs.
Usage: python bench/bench_units.py [--quick] [--runs N] [--seq T] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run

from prunekit.criteria.fisher import mean_gradient
from prunekit.criteria.groups import member_values
from prunekit.criteria.scores import make_criterion
from prunekit.data import load_data
from prunekit.export import export_onnx
from prunekit.export.verify import batch_of, feeds
from prunekit.finetune.bn import has_batchnorm, recalibrate_bn
from prunekit.finetune.loop import FinetuneSettings, evaluate, finetune
from prunekit.models import cnn, encoder, mlp
from prunekit.prune.masks import apply_masks
from prunekit.prune.schedules import schedule
from prunekit.prune.targets import find_targets
from prunekit.ranks import label_key
from prunekit.types import ClassificationTask
from prunekit.units import plan_units, select_units, shrink_result, unit_step, units_report

TASK = ClassificationTask()
LEVELS = (0.25, 0.5, 0.75)
STEPS = 3
SCORE_EXAMPLES = 1000


class Settings:
    """The settings fields the units functions read."""

    def __init__(self, criterion: str, sparsity: float, scope: str):
        self.criterion, self.sparsity, self.scope = criterion, sparsity, scope
        self.masked_scaling = False


class Run:
    """Stand-in for loop.py's _Run (until the lead wires --structure units)."""

    def __init__(self, model, plan, settings):
        self.model, self.task, self.units, self.settings = model, TASK, plan, settings
        self.masks, self.cache, self.estimators = plan.full_masks(), {}, {}


def _tp_member_terms(group, params, grads, kind: str) -> torch.Tensor:
    """Torch-Pruning's per-unit importance of one group (see the module docstring)."""
    terms = []
    for m in group.members:
        p = params[m.param]
        if m.param.endswith("bias"):
            continue  # TP default bias=False
        is_norm = p.dim() == 1  # BatchNorm weight
        if kind == "taylor" and is_norm:
            continue  # TP matches BN against its GroupNorm handler: never counted
        w = member_values(m, group.size, p)
        if kind == "l2":
            terms.append(w.pow(2).sum(1))
        else:
            terms.append((w * member_values(m, group.size, grads[m.param])).abs().sum(1))
    imp = torch.stack(terms).mean(0)
    return imp / imp.mean().clamp_min(1e-30)


def tp_scores(kind: str, model, plan, batches) -> dict:
    params = dict(model.named_parameters())
    grads = mean_gradient(model, TASK, plan.members, batches) if kind == "taylor" else None
    return {g.name: _tp_member_terms(g, params, grads, kind) for g in plan.groups}


def train(model, data, epochs: float, lr: float, optimizer: str = "adamw") -> None:
    gen = torch.Generator().manual_seed(0)
    phase = FinetuneSettings(epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=0.0)
    finetune(model, TASK, data.train_batches(100, gen), phase)


def guarded_finetune(model, data, gen, phase, masks) -> None:
    """Masked fine-tuning that, like prunekit's loop (best-of-phase guard), hands back the
    phase's starting weights when the phase ends with a higher validation loss."""
    before = evaluate(model, TASK, data.val_batches())["loss"]
    start = copy.deepcopy(model.state_dict())
    finetune(model, TASK, data.train_batches(100, gen), phase, masks=masks)
    if evaluate(model, TASK, data.val_batches())["loss"] > before:
        model.load_state_dict(start)


def prune_run(base, data, crit_name, kw, scope, sparsity, peer=None) -> dict:
    """One pruning run from a copy of ``base``: accuracy after pruning+fine-tuning."""
    model = copy.deepcopy(base)
    targets = find_targets(model)
    settings = Settings(crit_name, sparsity, scope)
    plan = plan_units(model, TASK, data, targets, settings)
    run = Run(model, plan, settings)
    crit = make_criterion(crit_name, **kw)
    gen = torch.Generator().manual_seed(1)  # the same batches for every row
    xs, ys = data.x_train[:SCORE_EXAMPLES], data.y_train[:SCORE_EXAMPLES]
    batches = [(xs[i : i + 250], ys[i : i + 250]) for i in range(0, SCORE_EXAMPLES, 250)]
    phase = FinetuneSettings(epochs=0.5, lr=0.01, momentum=0.9, weight_decay=5e-4)
    t0 = time.perf_counter()
    score_s = 0.0
    for k, target in enumerate(schedule(sparsity, STEPS, "exp"), start=1):
        s0 = time.perf_counter()
        if peer is None:
            unit_step(run, crit, batches, label_key(0, k), target)
        else:
            before = plan.keep_of(run.masks)
            keep = select_units(plan, tp_scores(peer, model, plan, batches), before, target, scope)
            run.masks = plan.masks_for(keep)
            apply_masks(model, run.masks)
        score_s += time.perf_counter() - s0
        if has_batchnorm(model):
            recalibrate_bn(
                model, data.train_batches(100, gen), forward=TASK.forward, max_batches=20
            )
        if k == STEPS:  # the last step's removal, before its fine-tuning
            pre_ft = evaluate(model, TASK, data.val_batches())["accuracy"]
        guarded_finetune(model, data, gen, phase, run.masks)
    final = FinetuneSettings(epochs=1.0, lr=0.01, momentum=0.9, weight_decay=5e-4)
    guarded_finetune(model, data, gen, final, run.masks)
    metrics = evaluate(model, TASK, data.val_batches())
    report = units_report(plan, run.masks)
    return {
        "model": model, "plan": plan, "masks": run.masks, "accuracy": metrics["accuracy"],
        "pre_ft": pre_ft, "units": report, "seconds": time.perf_counter() - t0,
        "score_seconds": score_s,
    }  # fmt: skip


def _session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def latency(paths: dict, example, runs: int, rounds: int = 5) -> dict:
    """p50 ms per (name, threads, batch), runners interleaved in ``rounds`` blocks."""
    runners = {}
    for threads in (1, 2):
        for name, path in paths.items():
            sess = _session(str(path), threads)
            for size in (1, 64):
                feed = feeds(sess, batch_of(example, size))
                runners[(name, threads, size)] = lambda s=sess, f=feed: s.run(None, f)
    samples = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            fn()
            for _ in range(max(1, runs // rounds)):
                t0 = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.percentile(v, 50)) for k, v in samples.items()}


def export(model, path: Path, example, forward=None) -> None:
    kw = {"forward": forward} if forward is not None else {}
    export_onnx(model.eval(), path, example, storage="dense", cleanup=False, latency=False, **kw)


CRITERIA = [
    ("group-L2 (prunekit)", "magnitude", {}, "global", None),
    ("group-Taylor (prunekit)", "lm", {}, "global", None),
    ("Fisher group obd-EKFAC", "obd", {"fisher": "ekfac", "labels": "sampled"}, "global", None),
    (
        "Fisher group obd-EKFAC, layer",
        "obd",
        {"fisher": "ekfac", "labels": "sampled"},
        "layer",
        None,
    ),
    (
        "Fisher group OBS-KFAC + update",
        "obs",
        {"fisher": "kfac", "labels": "sampled"},
        "global",
        None,
    ),
    ("TP group-L2 (peer)", "magnitude", {}, "layer", "l2"),
    ("TP group-Taylor (peer)", "magnitude", {}, "layer", "taylor"),
]
LATENCY_ROWS = ("Fisher group obd-EKFAC", "TP group-L2 (peer)")


def bench_classifier(label, base, data, runs, workdir, quick) -> tuple[list, list]:
    """Accuracy rows and latency rows of one trained classifier."""
    dense_acc = evaluate(base, TASK, data.val_batches())["accuracy"]
    example = data.x_val[:8]
    paths = {"dense": Path(workdir) / f"{label}-dense.onnx"}
    export(base, paths["dense"], example)
    acc_rows, shrunk_units = [], {}
    levels = (0.5,) if quick else LEVELS
    for s in levels:
        for name, crit, kw, scope, peer in CRITERIA:
            out = prune_run(base, data, crit, kw, scope, s, peer)
            u = out["units"]
            removed = f"{u['units_before'] - u['units_after']}/{u['units_before']}"
            acc_rows.append([
                label, f"{s:.0%}", name, scope, removed, f"{dense_acc:.4f}",
                f"{out['pre_ft']:.4f}", f"{out['accuracy']:.4f}", f"{out['score_seconds']:.1f}",
                f"{out['seconds']:.1f}",
            ])  # fmt: skip
            print(acc_rows[-1], flush=True)
            if name in LATENCY_ROWS:
                small = shrink_result(out["model"], out["plan"], out["masks"])
                key = f"{name} {s:.0%}"
                paths[key] = Path(workdir) / f"{label}-{len(paths)}.onnx"
                export(small, paths[key], example)
                shrunk_units[key] = (u, sum(p.numel() for p in small.parameters()))
    times = latency(paths, example, runs)
    lat_rows = []
    dense_params = sum(p.numel() for p in base.parameters())
    for key, (u, n_params) in shrunk_units.items():
        row = [label, key, f"{u['units_removed']:.2%}", _kept(u), f"{n_params / dense_params:.3f}"]
        for threads in (1, 2):
            for size in (1, 64):
                d, t = times[("dense", threads, size)], times[(key, threads, size)]
                row.append(f"{t:.3f} / {d:.3f} = {t / d:.3f}x")
        lat_rows.append(row)
    return acc_rows, lat_rows


def _kept(units: dict) -> str:
    """Kept/total units per group, e.g. '9/16, 20/32, 27/64'."""
    return ", ".join(f"{g['after']}/{g['before']}" for g in units["groups"].values())


def bench_encoder(runs, workdir, seq: int, quick: bool) -> list:
    """Latency rows of the MiniLM-sized encoder at each level (group-L2, scope 'layer')."""
    torch.manual_seed(0)
    base = encoder(vocab=4096, dim=384, heads=6, layers=6, ffn=1536).eval()
    example = base.example_inputs(batch=8, seq=seq, generator=torch.Generator().manual_seed(0))
    example["attention_mask"] = torch.ones_like(example["attention_mask"])
    ids = example["input_ids"].clamp_min(1)
    example["input_ids"] = ids

    def fwd(m, x):
        return m(x["input_ids"], x["attention_mask"])

    from prunekit.prune.trace import find_unit_groups
    from prunekit.units import UnitPlan

    groups = find_unit_groups(base, example, find_targets(base))
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    plan = UnitPlan(tuple(groups), shapes, {})
    params = dict(base.named_parameters())
    from prunekit.criteria.groups import group_scores

    scores = group_scores("magnitude", list(groups), params, normalize=True)
    paths = {"dense": Path(workdir) / "encoder-dense.onnx"}
    export(base, paths["dense"], example, fwd)
    info = {}
    for s in (0.5,) if quick else LEVELS:
        full = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
        keep = select_units(plan, scores, full, s, "layer")
        small = shrink_result(base, plan, plan.masks_for(keep)).eval()
        key = f"group-L2 {s:.0%}"
        paths[key] = Path(workdir) / f"encoder-{len(paths)}.onnx"
        export(small, paths[key], example, fwd)
        info[key] = (units_report(plan, plan.masks_for(keep)), small)
    times = latency(paths, example, runs)
    rows = []
    dense_params = sum(p.numel() for p in base.parameters())
    for key, (u, small) in info.items():
        row = [f"encoder (T={seq})", key, f"{u['units_removed']:.2%}", "per layer",
               f"{sum(p.numel() for p in small.parameters()) / dense_params:.3f}"]  # fmt: skip
        for threads in (1, 2):
            for size in (1, 64):
                d, t = times[("dense", threads, size)], times[(key, threads, size)]
                row.append(f"{t:.3f} / {d:.3f} = {t / d:.3f}x")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="50%% only")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--encoder-runs", type=int, default=15)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_data("mnist5k", seed=0)
    t0 = time.perf_counter()
    models = {}
    torch.manual_seed(0)
    models["MLP 784-300-100-10"] = mlp("784,300,100,10", act="tanh")
    train(models["MLP 784-300-100-10"], data, 20, 1e-3)
    torch.manual_seed(0)
    models["CNN+BN 16-32-64"] = cnn(bn=1)
    train(models["CNN+BN 16-32-64"], data, 8, 1e-3)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    acc_rows, lat_rows = [], []
    with tempfile.TemporaryDirectory() as work:
        for label, base in models.items():
            a, lt = bench_classifier(label, base.eval(), data, args.runs, work, args.quick)
            acc_rows += a
            lat_rows += lt
        lat_rows += bench_encoder(args.encoder_runs, work, args.seq, args.quick)
    body = summary(acc_rows, lat_rows)
    print(body)
    if not args.no_write:
        cmd = "python bench/bench_units.py" + (" --quick" if args.quick else "")
        update_section("units", "Structured pruning: units removed, accuracy and latency", cmd,
                       body)  # fmt: skip


def _ratio(cell: str) -> float:
    """The 'x dense' ratio of a latency cell 't / d = r x'."""
    return float(cell.rsplit("=", 1)[1].strip().rstrip("x"))


def goals(acc_rows, lat_rows) -> str:
    """Issue 17's goals, met or missed, with the numbers of this run."""
    lines = []
    for model, limit in (("MLP", 0.55), ("CNN", 0.55), ("encoder", 0.65)):
        rows = [r for r in lat_rows if r[0].startswith(model) and r[1].endswith(" 50%")]
        for r in rows:
            b64 = {1: _ratio(r[6]), 2: _ratio(r[8])}
            met = "met" if max(b64.values()) <= limit else "missed"
            lines.append(
                f"- 50% units, batch 64, {r[0]} shrunk by {r[1][:-4]}: ORT latency "
                f"{b64[1]:.3f}x (1 thread), {b64[2]:.3f}x (2 threads) of dense; goal <= "
                f"{limit}x: **{met}**"
            )
    for model in ("MLP", "CNN"):
        at = {r[2]: float(r[7]) for r in acc_rows if r[0].startswith(model) and r[1] == "50%"}
        base = at.get("group-L2 (prunekit)")
        for name in ("Fisher group obd-EKFAC", "Fisher group OBS-KFAC + update"):
            if base is None or name not in at:
                continue
            gain = 100 * (at[name] - base)
            met = "met" if gain >= 1.0 - 1e-6 else "missed"  # 1000 examples: 1 point = 10
            lines.append(
                f"- 50% units, {model}: {name} {at[name]:.4f} vs group-L2 {base:.4f} after the "
                f"same fine-tuning ({gain:+.1f} points); goal >= +1 point: **{met}**"
            )
    return "\n".join(lines)


def summary(acc_rows, lat_rows) -> str:
    acc = markdown_table(
        ["model", "units removed", "criterion", "scope", "units", "dense acc",
         "acc at last removal (pre-FT)", "acc after FT",
         "scoring s", "run s"], acc_rows,
    )  # fmt: skip
    lat = markdown_table(
        ["model", "shrunk by", "units removed", "kept per group", "params x dense",
         "ORT 1 thr b1 ms (x dense)", "ORT 1 thr b64", "ORT 2 thr b1", "ORT 2 thr b64"], lat_rows,
    )  # fmt: skip
    return (
        f"### Goals\n\n{goals(acc_rows, lat_rows)}\n\n### Accuracy after the same fine-tuning "
        f"budget\n\n{acc}\n\n### Latency (p50 ms shrunk / dense = ratio)\n\n{lat}\n"
    )


if __name__ == "__main__":
    main()
