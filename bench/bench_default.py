"""Is the default the best mode at its own budget? (issue 16), on three models, side by side.

Every row runs `prunekit prune`'s defaults (10 steps, 1 epoch of fine-tuning between steps,
2 final, lr 'auto', batch 100) and changes only the mode: the default (`--criterion auto`:
obs + the row-form update up to 95%, obd above), obd without an update (the default before),
gradual magnitude (GMP), GMP with twice the fine-tuning epochs,
obs + rows and SparseGPT, at 90%, 95% and 98.85% (1 - 0.8^20). Models:

- paper: the 784-300-100-10 tanh MLP that `prunekit example mlp-mnist` trains (SGD);
- adam: a 784-256-128-10 GELU MLP trained here with AdamW (lr 1e-3, weight decay 0.01,
  15 epochs): a checkpoint prunekit's own recipe did not make;
- digits: the 64-128-64-10 tanh MLP of `prunekit example mlp-digits` on scikit-learn's
  digits (about 1,440 training examples: one epoch is 15 batches).

paper and adam on mnist5k (4,000 train / 1,000 validation).

Accuracy is measured on examples no choice saw. A run chooses things on its validation
split (the lr probe, the weights each fine-tuning phase hands back, the update's damping),
so the bench halves the validation set: runs get half A as their validation split and are
scored on half B, then the other way round, ``--seeds`` seeds each (the seed moves the
batches and the Fisher label draws, not the dense model). A cell is the mean over both
halves (2 x seeds runs). Writes `default_<model>`.

    .venv/bin/python bench/bench_default.py [--model paper|adam|digits] [--seeds 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from prunekit.types import ClassificationTask, take_rows

SPARSITIES = (0.9, 0.95, 1 - 0.8**20)
DEFAULT = "default (`--criterion auto`: obs + rows up to 95%, obd above)"
GMP = "GMP (magnitude, same budget)"
MODES = {
    DEFAULT: {},
    "obd, no update (the default before)": {"criterion": "obd"},
    GMP: {"criterion": "magnitude"},
    "GMP with twice the fine-tuning (2 epochs between steps, 4 final)": {
        "criterion": "magnitude", "finetune_epochs": 2.0, "final_epochs": 4.0
    },
    "obs + `--update rows`": {"criterion": "obs", "update": "rows"},
    "sparsegpt": {"criterion": "sparsegpt"},
}


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


def halves(data) -> list[tuple]:
    """[(selection data, test batches), ...]: validation halves A and B, each way round."""
    half = data.n_val // 2
    parts = (slice(0, half), slice(half, data.n_val))
    out = []
    for pick, score in (parts, parts[::-1]):
        chosen = dataclasses.replace(
            data, x_val=take_rows(data.x_val, pick), y_val=data.y_val[pick]
        )
        test = dataclasses.replace(
            data, x_val=take_rows(data.x_val, score), y_val=data.y_val[score]
        )
        out.append((chosen, test.val_batches()))
    return out


_DONE: dict = {}  # resolved settings -> (accuracies, seconds): 'auto' reruns nothing twice


def run(dense, folds, over: dict, sparsity: float, seeds: int) -> tuple[list[float], float]:
    """Test-half accuracies (%) per run (fold-major) and mean seconds of one mode; a mode
    that resolves to the same settings as one already run (the default's obs + rows) reuses
    its runs (the runs are deterministic)."""
    plain = PruneSettings(sparsity=sparsity, ntk=False, **over)
    key = dataclasses.replace(plain, criterion=plain.criterion_name, update=plain.update_mode)
    if key not in _DONE:
        _DONE[key] = _run_mode(dense, folds, over, sparsity, seeds)
    return _DONE[key]


def _run_mode(dense, folds, over: dict, sparsity: float, seeds: int):
    accs, secs = [], []
    for chosen, test in folds:
        for seed in range(seeds):
            settings = PruneSettings(sparsity=sparsity, seed=seed, ntk=False, **over)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            run_pruning(model, chosen, settings)
            secs.append(time.perf_counter() - start)
            accs.append(100 * evaluate(model, ClassificationTask(), test)["accuracy"])
    return accs, statistics.mean(secs)


def paired(a: list[float], b: list[float]) -> str:
    """Mean of a - b over paired runs (same half, same seed) and its standard error."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return f"{statistics.mean(diffs):+.2f} ± {se:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(BUILDERS), default="paper")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    dense, data, metrics = BUILDERS[args.model]()
    print(f"dense: {metrics}", file=sys.stderr, flush=True)
    folds = halves(data)
    accs: dict[str, dict[float, list[float]]] = {}
    rows = []
    for label, over in MODES.items():
        cells, seconds = [], []
        for s in SPARSITIES:
            runs, sec = run(dense, folds, over, s, args.seeds)
            accs.setdefault(label, {})[s] = runs
            cells.append(f"{statistics.mean(runs):.2f} ± {statistics.pstdev(runs):.2f}")
            seconds.append(sec)
            print(f"{label} {s:.4f}: {cells[-1]} ({sec:.1f} s)", file=sys.stderr, flush=True)
        rows.append([label, *cells, f"{statistics.mean(seconds):.1f}"])
    verdicts = []
    for s in SPARSITIES:
        means = {m: statistics.mean(accs[m][s]) for m in accs}
        best = max(means, key=means.get)
        verdicts.append(
            f"- {100 * s:.2f}%: best {best} {means[best]:.2f}; default {means[DEFAULT]:.2f} "
            f"({paired(accs[DEFAULT][s], accs[best][s])} vs best, "
            f"{paired(accs[DEFAULT][s], accs[GMP][s])} vs GMP; paired runs, mean ± se)"
        )
    heads = ["mode", *[f"{100 * s:.2f}% (mean ± sd, %)" for s in SPARSITIES], "s per run"]
    body = (
        f"Dense accuracy {100 * metrics['accuracy']:.1f}% on the whole validation set; "
        f"{2 * args.seeds} runs per cell ({args.seeds} seeds x 2 validation halves, each run "
        f"scored on the half it did not choose on: {data.n_val // 2} and "
        f"{data.n_val - data.n_val // 2} examples); the CLI's default budget for every row."
        "\n\n" + markdown_table(heads, rows) + "\n\n" + "\n".join(verdicts)
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
