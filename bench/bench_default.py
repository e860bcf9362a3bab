"""Is the default the best mode at its own budget? (issue 16), on two models, side by side.

Every row runs `prunekit prune`'s defaults (10 steps, 1 epoch of fine-tuning between steps,
2 final, lr 'auto', batch 100) and changes only the mode: the default (obd on EKFAC, no
update), gradual magnitude (GMP), obs + the row-form update (`--update rows`), obd + rows,
and SparseGPT, at 90%, 95% and 98.85% (1 - 0.8^20), averaged over seeds (the seed moves the
batches and the Fisher label draws, not the dense model). Models:

- paper: the 784-300-100-10 tanh MLP that `prunekit example mlp-mnist` trains (SGD);
- adam: a 784-256-128-10 GELU MLP trained here with AdamW (lr 1e-3, weight decay 0.01,
  15 epochs): a checkpoint prunekit's own recipe did not make;
- digits: the 64-128-64-10 tanh MLP of `prunekit example mlp-digits` on scikit-learn's
  digits (about 1,440 training examples: one epoch is 15 batches).

paper and adam on mnist5k (4,000 train / 1,000 validation). Writes `default_<model>`.

    .venv/bin/python bench/bench_default.py [--model paper|adam|digits] [--seeds 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import train_example
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

SPARSITIES = (0.9, 0.95, 1 - 0.8**20)
MODES = {
    "default (obd, EKFAC, no update, basis refit when half the weights are gone)": {},
    "default with the first basis kept (`--refit-basis-below 0`, the old default)": {
        "refit_basis_below": 0.0
    },
    "GMP (magnitude, same budget)": {"criterion": "magnitude"},
    "obs + `--update rows`": {"criterion": "obs", "update": "rows"},
    "obd + `--update rows`": {"criterion": "obd", "update": "rows"},
    "sparsegpt": {"criterion": "sparsegpt"},
}
DEFAULT = "default (obd, EKFAC, no update, basis refit when half the weights are gone)"
GMP = "GMP (magnitude, same budget)"


def adam_gelu():
    """(model, data, dense metrics) of the AdamW-trained GELU MLP (module docstring)."""
    data = load_data("mnist5k", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.GELU(), nn.Linear(256, 128),
                          nn.GELU(), nn.Linear(128, 10))  # fmt: skip
    phase = FinetuneSettings(epochs=15, optimizer="adamw", lr=1e-3, weight_decay=0.01)
    task = ClassificationTask()
    finetune(model, task, data.train_batches(100, torch.Generator().manual_seed(0)), phase)
    return model, data, evaluate(model, task, data.val_batches())


def paper_mlp():
    model, _arch, name, dense = train_example("mlp-mnist", seed=0)
    return model, load_data(name, seed=0), dense


def digits_mlp():
    """`prunekit example mlp-digits`: 64-128-64-10 tanh on scikit-learn's 8x8 digits."""
    model, _arch, name, dense = train_example("mlp-digits", seed=0)
    return model, load_data(name, seed=0), dense


BUILDERS = {"paper": paper_mlp, "adam": adam_gelu, "digits": digits_mlp}
NAMES = {
    "paper": "the paper's MNIST MLP (SGD)",
    "adam": "an AdamW-trained GELU MLP",
    "digits": "the digits MLP (`prunekit example mlp-digits`)",
}


def run(dense, data, over: dict, sparsity: float, seeds: int) -> tuple[list[float], float]:
    """Validation accuracies (%) per seed and mean seconds of one mode at the CLI budget."""
    accs, secs = [], []
    for seed in range(seeds):
        settings = PruneSettings(sparsity=sparsity, seed=seed, ntk=False, **over)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = run_pruning(model, data, settings).report
        secs.append(time.perf_counter() - start)
        accs.append(100 * report["metrics"]["finetuned"]["accuracy"])
    return accs, statistics.mean(secs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(BUILDERS), default="paper")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    dense, data, metrics = BUILDERS[args.model]()
    print(f"dense: {metrics}", file=sys.stderr, flush=True)
    means: dict[str, dict[float, float]] = {}
    rows = []
    for label, over in MODES.items():
        cells, seconds = [], []
        for s in SPARSITIES:
            accs, sec = run(dense, data, over, s, args.seeds)
            means.setdefault(label, {})[s] = statistics.mean(accs)
            cells.append(f"{statistics.mean(accs):.2f} ± {statistics.pstdev(accs):.2f}")
            seconds.append(sec)
            print(f"{label} {s:.4f}: {cells[-1]} ({sec:.1f} s)", file=sys.stderr, flush=True)
        rows.append([label, *cells, f"{statistics.mean(seconds):.1f}"])
    verdicts = []
    for s in SPARSITIES:
        best = max(means, key=lambda m: means[m][s])
        d, g = means[DEFAULT][s], means[GMP][s]
        verdicts.append(
            f"- {100 * s:.2f}%: best {best} {means[best][s]:.2f}; default {d:.2f} "
            f"({d - means[best][s]:+.2f} vs best, {d - g:+.2f} vs GMP)"
        )
    heads = ["mode", *[f"{100 * s:.2f}% (mean ± sd, %)" for s in SPARSITIES], "s per run"]
    body = (
        f"Dense validation accuracy {100 * metrics['accuracy']:.1f}%; {args.seeds} seeds per "
        f"cell; the CLI's default budget for every row.\n\n"
        + markdown_table(heads, rows) + "\n\n" + "\n".join(verdicts)
    )  # fmt: skip
    title = f"Default vs other modes at the default budget: {NAMES[args.model]}"
    update_section(
        f"default_{args.model}", title,
        f".venv/bin/python bench/bench_default.py --model {args.model} --seeds {args.seeds}",
        body,
    )  # fmt: skip
    print(body)


if __name__ == "__main__":
    main()
