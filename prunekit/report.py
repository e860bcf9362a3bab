"""report.json and the run directory (design.md section 6).

``build_report`` turns a finished run into the report dict; ``write_run`` writes the run
directory, each file atomically: model.safetensors, masks.safetensors, metrics.jsonl,
report.json, and ntk.jsonl + probe.json and teacher.safetensors when the run made them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from prunekit.analysis.probe import save_probe
from prunekit.checkpoint import ARCH_KEY
from prunekit.data import DataBundle
from prunekit.distill import TEACHER_FILE
from prunekit.prune.masks import sparsity_of
from prunekit.prune.state import save_masks, save_tensors, write_json, write_jsonl
from prunekit.settings import PruneResult, PruneSettings, resolved_labels
from prunekit.types import Masks, Target, Task

STEP_KEYS = (
    "step",
    "sparsity",
    "loss_after_prune",
    "accuracy_after_prune",
    "loss_after_finetune",
    "accuracy",
    "seconds",
    "ntk_alignment",
    "loss_before_compensation",
    "loss_after_compensation",
    "loss_before_recalibration",
    "loss_after_recalibration",
    "cosine_after_prune",
    "cosine",
    "finetune_lr",
    "loss_before_finetune",
    "finetune_kept",
    "finetune_kept_iteration",
    "finetune_iterations",
)
_GATES = {"LSTM": ("input", "forget", "cell", "output"), "GRU": ("reset", "update", "new")}


def _param_counts(model: nn.Module, targets: dict[str, Target]) -> dict[str, int]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    zeros_all = sum(int((p == 0).sum()) for p in params.values())
    prunable = sum(params[n].numel() for n in targets)
    zeros = sum(int((params[n] == 0).sum()) for n in targets)
    return {"total": total, "prunable": prunable, "zeros": zeros, "zeros_all": zeros_all}


def _gate_sparsity(model: nn.Module, targets: dict[str, Target], masks: Masks) -> dict:
    """Recurrent targets: fraction pruned per gate (rows split in gate blocks, torch order).

    nn.LSTM, nn.LSTMCell and BN-LSTM cells stack gates i, f, g, o; nn.GRU and nn.GRUCell
    r, z, n (nn.RNN/RNNCell have no gates and get no entry).
    """
    modules = dict(model.named_modules())
    out = {}
    for name, target in targets.items():
        if target.kind != "recurrent":
            continue
        module = modules[target.module]
        kind = getattr(module, "original_name", None) or type(module).__name__
        gru = kind in ("GRU", "GRUCell")
        gates = _GATES["GRU"] if gru else _GATES["LSTM"] if "LSTM" in kind else None
        rows = masks[name].shape[0]
        if gates is None or rows % len(gates):
            continue
        blocks = masks[name].reshape(len(gates), rows // len(gates), -1)
        out[name] = {g: float((~b).float().mean()) for g, b in zip(gates, blocks, strict=True)}
    return out


def build_report(settings, crit, task, model, targets, masks, rows, estimators, metrics, seconds):
    """report.json content (design.md section 6 keys, plus settings and counts)."""
    global_sparsity, per_layer = sparsity_of(masks)
    counts = _param_counts(model, targets)
    return {
        "criterion": settings.criterion_name,
        "criterion_requested": settings.criterion,
        "fisher": crit.fisher if crit.uses_curvature else None,
        "fisher_labels": resolved_labels(crit, task) if crit.uses_curvature else None,
        "estimators": estimators,
        "lambda": settings.lam,
        "scope": settings.scope,
        "schedule": {"kind": settings.schedule, "steps": settings.steps},
        "target_sparsity": settings.sparsity,
        "sparsity": {
            "global": global_sparsity,
            "all_parameters": counts["zeros_all"] / counts["total"],
            "per_layer": per_layer,
            "per_gate": _gate_sparsity(model, targets, masks),
        },
        "params": counts,
        "metrics": metrics,
        "steps": [{k: r[k] for k in STEP_KEYS if k in r} for r in rows[1:]],
        "seconds": seconds,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
        },
    }


def finetune_report(settings: PruneSettings, lr, lr_probe, rows: list[dict], final) -> dict:
    """report.json 'finetune': ``lr`` (the rate every phase used; None when no phase ran),
    ``lr_setting`` ('auto' or the number asked for), ``lr_probe`` (for 'auto': the probing
    step, steps per candidate, validation loss before, and the table {lr, loss, accuracy}),
    ``checkpoints`` (validation evaluations per phase), ``rolled_back`` (steps whose phase
    handed back earlier weights than its last) and ``final`` (the final phase: kept,
    kept_iteration, iterations, loss_before, loss; None when it did not run)."""
    if lr is None and settings.lr != "auto":
        lr = float(settings.lr)
    final_entry = None
    if final is not None:
        final_entry = {k: final[k] for k in ("kept", "kept_iteration", "iterations")}
        final_entry.update(loss_before=final["loss_before"], loss=final["metrics"]["loss"])
    return {
        "lr": lr,
        "lr_setting": settings.lr,
        "lr_probe": lr_probe,
        "checkpoints": settings.finetune_checkpoints,
        "rolled_back": [r["step"] for r in rows if r.get("finetune_kept") not in (None, "end")],
        "final": final_entry,
    }


def task_report(task: Task, settings: PruneSettings) -> dict:
    """report.json 'task': kind, the user task's spec, and distillation settings."""
    out = {"kind": task.kind, "spec": settings.task_spec, "loss": settings.loss}
    if task.kind == "distill":
        out.update(distill_metric=task.metric, temperature=task.temperature, variance=task.variance)
        out["distill_weight"] = 1.0 - task.task_weight
    return out


def data_report(data: DataBundle) -> dict:
    """report.json 'data': where validation came from ('explicit', or 'random 80/20 (seed
    S)' for a seeded split) and the example counts of each part."""
    return {"split": data.split, "train": data.n_train, "val": data.n_val}


def write_run(out, result: PruneResult, arch: str | None, data_name: str) -> list:
    """Write the run directory of design.md section 6 (each file atomically)."""
    out = Path(out)
    meta = {
        "prunekit.criterion": result.report["criterion"],
        "prunekit.sparsity": f"{result.report['sparsity']['global']:.6f}",
        "prunekit.data": data_name,
        "prunekit.step": str(len(result.report["steps"])),
    }
    if "units" in result.report:  # full shapes, units zeroed: export shrinks it
        meta["prunekit.structure"] = "units"
    if arch:
        meta[ARCH_KEY] = arch
    state = result.model.state_dict()
    extra = []
    if result.probe is not None:
        extra += [write_jsonl(out / "ntk.jsonl", result.ntk), save_probe(out, result.probe)]
    if result.teacher is not None:
        teacher_meta = {"prunekit.kind": "teacher", "prunekit.data": data_name}
        extra.append(save_tensors(out / TEACHER_FILE, result.teacher, teacher_meta))
    return extra + [
        save_tensors(out / "model.safetensors", state, meta),
        save_masks(out / "masks.safetensors", result.masks, meta),
        write_jsonl(out / "metrics.jsonl", result.metrics),
        write_json(out / "report.json", result.report),
    ]
