"""Benchmark: Fisher labels (exact vs sampled k = 1, 4, 16) at a fixed time budget (issue 16).

For each bench model, the budget is the time of today's default curvature (EKFAC, one
sampled label per example) on ``score_examples`` = 1000 training examples (the
PruneSettings default). Every label mode of EKFAC and of the diag estimator then gets as
many training examples as fit in that budget (a linear time model t = a + b*n from two
calibration fits, capped at the training set), and is scored on:

- rel.err: ||d - d_ref|| / ||d_ref|| of its parameter-space Fisher diagonal (all target
  weights), d_ref = the exact-label diagonal Fisher on the WHOLE training set;
- OBD one shot: global OBD (score w^2 d) masks at 90% and 95% applied to the trained
  model, no fine-tuning: validation accuracy (the distillation model: mean cosine of the
  pruned model's embeddings to the dense ones).

Rows "(default data)": the same measures at the default run's data (1000 examples, or
the whole training set if smaller) whatever the time, i.e. what ``prunekit prune`` gets.
Each row is the mean over ``--seeds`` seeds (the seed draws the examples' labels and
which examples are used). Models: the paper's MNIST MLP 784-300-100-10 tanh and the
784-40-20-10 ReLU MLP without biases (mnist5k, trained like ``prunekit example
mlp-mnist``), the digits CNN (``prunekit example cnn-digits``), and a regression-like
task with more than 32 outputs: the ``encoder-tokens`` example's pooled 64-d embedding
under DistillationTask(cosine). There, the labels are y ~ N(unit(student), I); 'exact'
(not a built-in option for cosine) is the expectation over that Gaussian, i.e. one term
per output dimension (the Gauss-Newton diagonal), computed here by a task wrapper.

    .venv/bin/python bench/bench_labels.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import train_example
from prunekit.criteria.curvature import fit_curvature
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.models import EXAMPLES, encoder
from prunekit.prune.masks import apply_masks, full_masks, next_masks
from prunekit.prune.targets import find_targets
from prunekit.tasks import DistillationTask
from prunekit.types import ClassificationTask, Task

MODES = [("exact", 1), ("sampled", 1), ("sampled", 4), ("sampled", 16)]
ESTIMATORS = ("ekfac", "diag")
SPARSITIES = (0.9, 0.95)
DEFAULT_EXAMPLES = 1000  # PruneSettings.score_examples
BATCH = 100


class ExactCosine(DistillationTask):
    """DistillationTask(cosine) whose 'exact' labels are the Gaussian's expectation.

    The cosine NLL is 0.5 |unit(student) - y|^2 with y ~ N(unit(student), I), so the
    exact Fisher is J^T J of unit(student): one term per output dimension.
    """

    def __init__(self, base: Task):
        super().__init__(base, "cosine")

    @property
    def categorical(self) -> bool:  # lets check_labels accept 'exact' (bench only)
        return True

    def exact_terms(self, outputs):
        return list(self._student(outputs).unbind(1))


DECISION = """Default chosen from these tables (``criteria/curvature.py`` ``default_labels``):
'exact' labels for every estimator on a classifier with at most 32 classes (EKFAC included:
it used 'sampled' before), 'sampled' with one label per example otherwise (more classes,
regression, distillation with mse/cosine). Read per model: the exact-label EKFAC rows
against the sampled ones at the same budget (rel.err and OBD one shot), and the "(default
data)" EKFAC exact row against the exact-diagonal reference (the issue's rule: the
default never below the exact diagonal)."""


def mlp40() -> nn.Module:
    """784-40-20-10 ReLU MLP without biases."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 40, bias=False), nn.ReLU(),
        nn.Linear(40, 20, bias=False), nn.ReLU(), nn.Linear(20, 10, bias=False),
    )  # fmt: skip


def _classifier(name: str, quick: bool):
    """(model, task, train batches (list), validation metric fn, train size)."""
    if name == "mlp40":
        ex = EXAMPLES["mlp-mnist"]
        data = load_data(ex.data, seed=0)
        torch.manual_seed(0)
        model = mlp40()
        phase = FinetuneSettings(epochs=2 if quick else ex.epochs, lr=ex.lr, lr_schedule="cosine")
        finetune(model, ClassificationTask(), data.train_batches(BATCH, torch.Generator()), phase)
    else:
        model, _arch, spec, _m = train_example(name, seed=0)
        data = load_data(spec, seed=0)
    task = ClassificationTask()
    val = list(data.val_batches())

    def metric(m):
        return evaluate(m, task, val)["accuracy"]

    return model.eval(), task, data.x_train, data.y_train, metric


def _distill(quick: bool):
    """The encoder-tokens example's pooled embedding as a 64-output distillation model."""
    model, _arch, spec, _m = train_example("encoder-tokens", seed=0)
    data = load_data(spec, seed=0)
    dense = encoder(vocab=64, dim=64, heads=4, layers=2, ffn=128, max_len=32, classes=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    dense.load_state_dict(state)
    dense.eval()
    task = ExactCosine(Task())
    with torch.no_grad():
        y_train = task.prepare(dense(**data.x_train))
        ref = dense(**data.x_val)

    def metric(m):
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(m(**data.x_val), ref, dim=1).mean())

    return dense, task, data.x_train, y_train, metric


def _rows(x, sl):
    return {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else x[sl]


def batches_of(x, y, order: torch.Tensor, n: int) -> list:
    """The examples order[:n] in batches of BATCH."""
    idx = order[:n]
    return [(_rows(x, idx[i : i + BATCH]), y[idx[i : i + BATCH]]) for i in range(0, n, BATCH)]


def fit(model, task, targets, batches, estimator, labels, samples, seed):
    """(seconds, parameter-space diagonal) of one curvature fit."""
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    curv = fit_curvature(
        estimator, model, task, targets, batches, labels=labels, samples=samples, generator=gen
    )
    diag = curv.diagonal()
    return time.perf_counter() - start, diag


def rel_err(diag: dict, ref: dict) -> float:
    """||diag - ref|| / ||ref|| over all targets."""
    num = sum(float((diag[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].double().pow(2).sum()) for n in ref)
    return (num / den) ** 0.5


def obd_metrics(model, targets, diag, metric) -> list[float]:
    """Validation metric after one-shot global OBD (score w^2 d) at each of SPARSITIES."""
    params = dict(model.named_parameters())
    scores = {n: (params[n].detach().double().pow(2) * diag[n].double()).float() for n in targets}
    out = []
    for s in SPARSITIES:
        masks = next_masks(scores, full_masks({n: params[n] for n in targets}), s, "global")
        m = copy.deepcopy(model)
        apply_masks(m, masks)
        out.append(metric(m))
    return out


def examples_for_budget(model, task, targets, x, y, order, budget, est, labels, k, total):
    """Examples that fit in ``budget`` seconds: t = a + b*n from fits on n1 and n2 examples."""
    n1, n2 = min(2 * BATCH, total), min(DEFAULT_EXAMPLES, total)

    def best(n):  # best of 2: the machine is shared
        batches = batches_of(x, y, order, n)
        return min(fit(model, task, targets, batches, est, labels, k, 0)[0] for _ in range(2))

    t1 = best(n1)
    if t1 >= budget:  # already over budget at n1 examples: the minimum, no costlier probe
        return BATCH
    t2 = best(n2)
    per = max((t2 - t1) / max(1, n2 - n1), 1e-9)
    fixed = max(0.0, t1 - per * n1)
    n = int((budget - fixed) / per) // BATCH * BATCH
    return max(BATCH, min(total, n))


def same_data_row(model, task, targets, x, y, total, ref, metric, est, labels, seeds):
    """A row at the default run's data (score_examples = 1000), whatever the time."""
    n = min(DEFAULT_EXAMPLES, total)
    secs, errs, accs = [], [], []
    for seed in range(seeds):
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        s, d = fit(model, task, targets, batches_of(x, y, order, n), est, labels, 1, seed)
        secs.append(s)
        errs.append(rel_err(d, ref))
        accs.append(obd_metrics(model, targets, d, metric))
    mode = "exact" if labels == "exact" else "sampled k=1"
    row = [f"{est} (default data)", mode, n, f"{sum(secs) / seeds:.2f}"]
    row.append(f"{sum(errs) / seeds:.3f}")
    return row + [f"{sum(a[i] for a in accs) / seeds:.4f}" for i in range(len(SPARSITIES))]


def bench_model(name: str, quick: bool, seeds: int) -> tuple[str, list[list]]:
    """(description, table rows) for one model."""
    t0 = time.perf_counter()
    model, task, x, y, metric = _distill(quick) if name == "encoder" else _classifier(name, quick)
    train_s = time.perf_counter() - t0
    targets = find_targets(model)
    total = len(y)
    if quick:
        total = min(total, 600)
    everything = batches_of(x, y, torch.arange(total), total)
    t_ref, ref = fit(model, task, targets, everything, "diag", "exact", 1, 0)
    dense = metric(model)
    rows = [["exact diag, all examples (reference)", "-", total, f"{t_ref:.2f}", "0.000"]]
    rows[0] += [f"{v:.4f}" for v in obd_metrics(model, targets, ref, metric)]
    params = dict(model.named_parameters())
    mag = {n: params[n].detach().abs() for n in targets}
    rows.append(["magnitude", "-", "-", "-", "-"])
    rows[-1] += [f"{v:.4f}" for v in obd_metrics(model, targets, mag, metric)]
    n_default = min(DEFAULT_EXAMPLES, total)
    order0 = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    fit(model, task, targets, batches_of(x, y, order0, n_default), "ekfac", "sampled", 1, 0)
    budget = min(
        fit(model, task, targets, batches_of(x, y, order0, n_default), "ekfac", "sampled", 1, s)[0]
        for s in range(2)
    )
    for est in ESTIMATORS:
        for labels, k in MODES:
            n = examples_for_budget(
                model, task, targets, x, y, order0, budget, est, labels, k, total
            )
            secs, errs, accs = [], [], []
            for seed in range(seeds):
                order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
                batches = batches_of(x, y, order, n)
                s, d = fit(model, task, targets, batches, est, labels, k, seed)
                secs.append(s)
                errs.append(rel_err(d, ref))
                accs.append(obd_metrics(model, targets, d, metric))
            mode = "exact" if labels == "exact" else f"sampled k={k}"
            rows.append([est, mode, n, f"{sum(secs) / seeds:.2f}", f"{sum(errs) / seeds:.3f}"])
            rows[-1] += [f"{sum(a[i] for a in accs) / seeds:.4f}" for i in range(len(SPARSITIES))]
            print(name, rows[-1], flush=True)
    for est, labels in (("ekfac", "exact"), ("ekfac", "sampled"), ("diag", "exact")):
        rows.append(
            same_data_row(model, task, targets, x, y, total, ref, metric, est, labels, seeds)
        )
        print(name, rows[-1], flush=True)
    what = "val. accuracy" if name != "encoder" else "val. cosine to dense"
    desc = (
        f"**{name}**: dense {what} {dense:.4f}; {total} training examples; budget "
        f"{budget:.2f} s (EKFAC, 1 sampled label, {n_default} examples); trained in "
        f"{train_s:.0f} s; {seeds} seed(s) per row."
    )
    return desc, rows


def main() -> None:
    """Run every model, print and write the ``labels`` section of BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--models", nargs="+", default=["mlp-mnist", "mlp40", "cnn-digits", "encoder"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = []
    for name in args.models:
        desc, rows = bench_model(name, args.quick, args.seeds)
        headers = ["estimator", "labels", "examples", "fit s", "rel.err vs exact diag"]
        headers += [f"OBD {s:.0%} one shot" for s in SPARSITIES]
        table = markdown_table(headers, rows)
        print(desc, "\n", table, flush=True)
        parts.append(f"{desc}\n\n{table}\n")
    if args.quick or args.no_write:
        return
    body = __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0] + "\n\n" + "\n".join(parts)
    body += "\n" + DECISION + "\n"
    command = "python bench/bench_labels.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
    update_section(
        "labels", "Fisher labels: exact vs sampled at a fixed time budget", command, body
    )


if __name__ == "__main__":
    main()
