"""LSTM vs BN-LSTM: row-by-row mnist5k training curves; pruning with/without BN recalibration.

Run: .venv/bin/python bench/bench_recurrent.py [--epochs 4] [--data mnist5k] [--prune-data digits]
Writes docs/bench_recurrent_curves.png and prints markdown tables (not a timed test).

Part 1 (Cooijmans et al.'s claim: BN-LSTM converges faster): both models trained with the
same optimizer (Adam, lr 2e-3, grad-norm clip 1, batch 100) from the same seed; validation
loss/accuracy after every epoch. Part 2: each example model pruned to 85% with OBD on the
diagonal Fisher (prunekit.pipeline.run_pruning), once with fine-tuning between steps and once
without any (the stale-statistics case), then accuracy before/after ``recalibrate_bn``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import stdout_to_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import train_example
from prunekit.checkpoint import build_model
from prunekit.data import load_data
from prunekit.finetune import evaluate
from prunekit.finetune.bn import recalibrate_bn
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import make_task

ROOT = Path(__file__).resolve().parents[1]


def arch(cell: str, side: int, hidden: int) -> str:
    return (
        f"prunekit.models:lstm?input_size={side}&hidden={hidden}&classes=10&cell={cell}&rows={side}"
    )


def curves(data_spec: str, epochs: int, hidden: int, seed: int = 0) -> dict[str, list[dict]]:
    """Validation loss/accuracy per epoch (epoch 0 = at initialisation) for lstm and bnlstm."""
    data = load_data(data_spec, seed=seed)
    task = make_task(data.kind)
    side = data.x_train.shape[-1]
    out = {}
    for cell in ("lstm", "bnlstm"):
        torch.manual_seed(seed)
        model = build_model(arch(cell, side, hidden))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(seed)
        rows = [{"epoch": 0, **evaluate(model, task, data.val_batches()), "seconds": 0.0}]
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in data.train_batches(100, gen):
                opt.zero_grad(set_to_none=True)
                task.loss(task.forward(model, batch), batch).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            metrics = evaluate(model, task, data.val_batches())
            rows.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - start})
        out[cell] = rows
    return out


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for cell, rows in results.items():
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["loss"] for r in rows], marker="o", label=cell)
        axes[1].plot(ep, [r["accuracy"] for r in rows], marker="o", label=cell)
    axes[0].set(xlabel="epoch", ylabel="validation loss", title=title)
    axes[1].set(xlabel="epoch", ylabel="validation accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_table(results: dict[str, list[dict]]) -> str:
    lines = ["| epoch | LSTM val loss | LSTM val acc | BN-LSTM val loss | BN-LSTM val acc |",
             "|---|---|---|---|---|"]  # fmt: skip
    for a, b in zip(results["lstm"], results["bnlstm"], strict=True):
        lines.append(
            f"| {a['epoch']} | {a['loss']:.4f} | {a['accuracy']:.4f} | {b['loss']:.4f} | "
            f"{b['accuracy']:.4f} |"
        )
    secs = {k: v[-1]["seconds"] for k, v in results.items()}
    lines.append(f"\ntraining seconds: LSTM {secs['lstm']:.1f}, BN-LSTM {secs['bnlstm']:.1f}")
    return "\n".join(lines)


def prune_rows(example: str, sparsity: float, steps: int, seed: int = 0) -> list[dict]:
    """Accuracy after pruning, with fine-tuning and without, before/after BN recalibration."""
    rows = []
    for ft in (1.0, 0.0):
        model, _, data_spec, dense = train_example(example, seed=seed)
        data = load_data(data_spec, seed=seed)
        task = make_task(data.kind)
        settings = PruneSettings(
            criterion="obd", fisher="diag", labels="empirical", sparsity=sparsity, steps=steps,
            score_examples=500, finetune_epochs=ft, final_epochs=2 * ft, lr=0.1, ntk=False,
            seed=seed,
        )  # fmt: skip
        start = time.perf_counter()
        result = run_pruning(model, data, settings, task)
        seconds = time.perf_counter() - start
        before = evaluate(model, task, data.val_batches())
        gen = torch.Generator().manual_seed(seed)
        info = recalibrate_bn(model, data.train_batches(100, gen), forward=task.forward)
        after = evaluate(model, task, data.val_batches())
        rows.append({
            "example": example, "finetune_epochs": ft, "dense": dense["accuracy"],
            "sparsity": result.report["sparsity"]["global"], "no_recal": before["accuracy"],
            "recal": after["accuracy"], "recal_batches": info["batches"], "seconds": seconds,
        })  # fmt: skip
    return rows


def prune_table(rows: list[dict]) -> str:
    lines = ["| model | fine-tune epochs/step | dense acc | sparsity | acc, no recal | "
             "acc, BN recalibrated | prune s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        recal = "n/a (no BN)" if r["recal_batches"] == 0 else f"{r['recal']:.4f}"
        lines.append(
            f"| {r['example']} | {r['finetune_epochs']:g} | {r['dense']:.4f} | "
            f"{r['sparsity']:.3f} | {r['no_recal']:.4f} | {recal} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--prune-data", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--sparsity", type=float, default=0.85)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-curves", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.skip_curves:
        results = curves(args.data, args.epochs, args.hidden)
        png = ROOT / "docs" / "bench_recurrent_curves.png"
        plot(results, png, f"row-by-row {args.data}")
        print(f"## LSTM vs BN-LSTM, row-by-row {args.data} (hidden {args.hidden})\n")
        print(curves_table(results))
        print(f"\n![curves]({png.relative_to(ROOT)})\n")
    rows = []
    for cell in ("lstm", "bnlstm"):
        rows += prune_rows(f"{cell}-{args.prune_data}", args.sparsity, args.steps)
    print(f"## Pruning to {args.sparsity:.0%} (OBD, diag Fisher), BN recalibration\n")
    print(prune_table(rows))


if __name__ == "__main__":
    with stdout_to_section(
        "recurrent", "Recurrent models: LSTM vs BN-LSTM, pruning with BN recalibration"
    ):
        main()
