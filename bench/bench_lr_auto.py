"""Fine-tuning rate: `--lr auto` (the default) vs the old fixed 0.01, on pretrained models.

For each model: train it (zoo examples with their own recipe; two Adam-trained models), then
prune with the CLI defaults (OBD, 90% in 10 exponential steps, 1 fine-tuning epoch per step,
2 final epochs; ``--steps``/``--sparsity`` override) at lr 'auto' and at lr 0.01. Every phase
keeps its best weights on validation (rolled back when fine-tuning made it worse), so the
final loss can never be worse than right after the last pruning step; the table shows by
how much each rate improves on it, the chosen rate and the probe's table.
Usage: python bench/bench_lr_auto.py [--examples a,b,...] [--steps N] [--sparsity S]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.api import resolve_data, train_example
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

EXAMPLES = ("lstm-digits", "bnlstm-digits", "encoder-tokens")


def adam_mlp(scale: float):
    """64-300-100-10 tanh MLP trained with AdamW (lr 1e-3, 40 epochs) on digits whose
    pixels are multiplied by ``scale`` (1 = as bundled; 100 = unnormalised features)."""
    data = load_data("digits", seed=0)
    data = dataclasses.replace(data, x_train=data.x_train * scale, x_val=data.x_val * scale)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 100),
                          nn.Tanh(), nn.Linear(100, 10))  # fmt: skip
    phase = FinetuneSettings(epochs=40, optimizer="adamw", lr=1e-3, weight_decay=0.0)
    task = ClassificationTask()
    finetune(model, task, data.train_batches(100, torch.Generator().manual_seed(0)), phase)
    return model, data, evaluate(model, task, data.val_batches())


def models(names):
    for name in names:
        model, _arch, spec, dense = train_example(name, seed=0)
        yield name, model, resolve_data(spec, seed=0), dense
    for scale in (1, 100):
        model, data, dense = adam_mlp(scale)
        yield f"Adam MLP 64-300-100-10, digits x{scale}", model, data, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(EXAMPLES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    rows, probes = [], []
    for name, model, data, dense in models([e for e in args.examples.split(",") if e]):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for lr in ("auto", 0.01):
            model.load_state_dict(state)
            settings = PruneSettings(
                criterion="obd", sparsity=args.sparsity, steps=args.steps, lr=lr, ntk=False
            )
            start = time.perf_counter()
            report = run_pruning(model, data, settings).report
            seconds = time.perf_counter() - start
            m, ft = report["metrics"], report["finetune"]
            rows.append([name, str(lr), f"{ft['lr']:g}", dense["loss"], m["pruned"]["loss"],
                         m["finetuned"]["loss"], m["finetuned"]["loss"] - m["pruned"]["loss"],
                         m["finetuned"]["accuracy"] if m["finetuned"]["accuracy"] is not None
                         else "-", ", ".join(map(str, ft["rolled_back"])) or "-",
                         f"{seconds:.1f}"])  # fmt: skip
            if ft["lr_probe"]:
                table = ft["lr_probe"]["table"]
                probes.append([name, f"{ft['lr_probe']['loss_before']:.4f}",
                               *(f"{r['loss']:.4f}" for r in table), f"{ft['lr']:g}"])  # fmt: skip
            print(rows[-1], flush=True)
    body = (
        f"OBD (EKFAC), {args.sparsity:g} sparsity in {args.steps} exponential steps, 1 epoch "
        "of SGD (momentum 0.9, wd 5e-4) per step, 2 final epochs; losses on the validation "
        "split. 'pruned' = right after the last pruning step, 'final' = after the final "
        "fine-tune; rolled back = steps whose phase handed back earlier weights.\n\n"
        + markdown_table(["model", "--lr", "rate used", "dense loss", "pruned loss",
                          "final loss", "final - pruned", "final acc", "rolled back",
                          "seconds"], rows)  # fmt: skip
        + "\n\nThe probe of `--lr auto` (validation loss after 20 steps, or one epoch when "
        "shorter, at each rate from the step-1 weights; the largest rate within 1% of the "
        "lowest wins):\n\n"
        + markdown_table(["model", "loss before", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2",
                          "chosen"], probes)  # fmt: skip
    )
    cmd = "python bench/bench_lr_auto.py"
    update_section("lr_auto", "Fine-tuning rate: --lr auto vs the old 0.01", cmd, body)


if __name__ == "__main__":
    main()
