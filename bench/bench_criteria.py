"""Criteria x locality benchmark on the paper's MNIST MLP (issue 2).

Trains the 784-300-100-10 tanh MLP with `prunekit example mlp-mnist` settings, then prunes
copies with magnitude, LM, QM, OBD (diag exact Fisher, as in the paper's code) and OBD on
EKFAC, at 90% and at the paper's 98.847%, in 1, 14 and 140 steps with no fine-tuning
between steps (the paper's protocol), then one fine-tune of the same budget for every run.
torch.nn.utils.prune.global_unstructured (L1), one-shot and iterative, gets the same
fine-tuning budget in the same run. Writes its table into BENCHMARKS.md.

    .venv/bin/python bench/bench_criteria.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.utils.prune as torch_prune
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import train_example
from prunekit.data import load_data
from prunekit.finetune import evaluate
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import make_task

RUNS = [  # (label, criterion, fisher, labels)
    ("magnitude", "magnitude", None, None),
    ("lm", "lm", None, None),
    ("qm (diag, exact)", "qm", "diag", "exact"),
    ("obd (diag, exact)", "obd", "diag", "exact"),
    ("obd (ekfac, sampled)", "obd", "ekfac", "sampled"),
    ("qm (ekfac, sampled)", "qm", "ekfac", "sampled"),
    ("obs (ekfac, sampled)", "obs", "ekfac", "sampled"),
]
PAPER_SPARSITY = 1 - 0.8**20  # 0.98847
FT_EPOCHS, LR, BATCH = 5.0, 0.01, 100


def prunekit_row(dense, data, label, crit, fisher, labels, sparsity, steps):
    model = copy.deepcopy(dense)
    settings = PruneSettings(
        criterion=crit,
        fisher=fisher,
        labels=labels,
        sparsity=sparsity,
        steps=steps,
        finetune_epochs=0.0,
        final_epochs=FT_EPOCHS,
        lr=LR,
        batch_size=BATCH,
        seed=0,
        ntk=False,  # timed without NTK logging (bench_ntk_curves measures its overhead)
    )
    t0 = time.perf_counter()
    report = run_pruning(model, data, settings).report
    seconds = time.perf_counter() - t0
    m = report["metrics"]
    return [
        label,
        f"{sparsity:.4f}",
        steps,
        m["pruned"]["loss"],
        m["pruned"]["accuracy"],
        m["finetuned"]["loss"],
        m["finetuned"]["accuracy"],
        f"{seconds:.1f}",
    ]


def _torch_finetune(model, task, data, epochs):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    batches = data.train_batches(BATCH, gen)
    model.train()
    for _ in range(int(epochs)):
        for batch in batches:
            opt.zero_grad()
            task.loss(model(batch[0]), batch).backward()
            opt.step()
    model.eval()


def torch_row(dense, data, sparsity, steps):
    """torch.nn.utils.prune global L1, `steps` rounds of the same fraction of the remaining."""
    task = make_task(data.kind)
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    per_step = 1 - (1 - sparsity) ** (1 / steps)
    for _ in range(steps):
        torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=per_step)
    pruned = evaluate(model, task, data.val_batches())
    _torch_finetune(model, task, data, FT_EPOCHS)
    for module, name in params:
        torch_prune.remove(module, name)
    tuned = evaluate(model, task, data.val_batches())
    seconds = time.perf_counter() - t0
    return [
        "torch global L1",
        f"{sparsity:.4f}",
        steps,
        pruned["loss"],
        pruned["accuracy"],
        tuned["loss"],
        tuned["accuracy"],
        f"{seconds:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="steps 1 and 3 only (smoke run)")
    args = parser.parse_args()
    step_grid = (1, 3) if args.quick else (1, 14, 140)
    dense, _arch, data_name, dense_metrics = train_example("mlp-mnist", seed=0)
    data = load_data(data_name, seed=0)
    rows = []
    for sparsity in (0.9, PAPER_SPARSITY):
        for steps in step_grid:
            for label, crit, fisher, labels in RUNS:
                rows.append(prunekit_row(dense, data, label, crit, fisher, labels, sparsity, steps))
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
        for steps in (1, step_grid[1]):
            rows.append(torch_row(dense, data, sparsity, steps))
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = [
        "criterion",
        "sparsity",
        "steps",
        "loss after prune",
        "acc after prune",
        "loss after FT",
        "acc after FT",
        "seconds",
    ]
    body = (
        f"Dense 784-300-100-10 tanh MLP on mnist5k (4,000 train / 1,000 validation): "
        f"loss {dense_metrics['loss']:.4f}, accuracy {dense_metrics['accuracy']:.4f}. "
        f"Scores from the first 1,000 training examples; no fine-tuning between steps; then "
        f"{FT_EPOCHS:g} epochs of SGD (lr {LR}, momentum 0.9, wd 5e-4, batch {BATCH}) for every "
        "row, torch's included. Metrics on the validation split.\n\n"
        + markdown_table(headers, rows)
    )
    cmd = "python bench/bench_criteria.py" + (" --quick" if args.quick else "")
    update_section("criteria", "Criteria and locality on the paper's MNIST MLP", cmd, body)
    print(f"wrote BENCHMARKS.md ({len(rows)} rows)")


if __name__ == "__main__":
    main()
