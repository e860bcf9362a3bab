"""The only module that wires the rooms together: the pruning loop of design.md section 4.

load -> score -> next masks -> apply -> fine-tune -> metrics, for every step of the
schedule, then a final fine-tune and the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.criteria import CRITERIA, make_criterion
from prunekit.criteria.fisher import check_labels
from prunekit.data import DataBundle, check_data_fits
from prunekit.errors import SettingError, choice_error
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.prune.masks import SCOPES, apply_masks, full_masks, next_masks, sparsity_of
from prunekit.prune.schedules import schedule
from prunekit.prune.targets import find_targets
from prunekit.types import Masks, Target, Task, batch_to, make_task

log = logging.getLogger("prunekit")

# progress(label, done, total): the CLI draws bars from these calls; None = silent.
Progress = Callable[[str, int, int], None]
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class PruneSettings:
    """Everything one pruning run needs besides the model and data.

    sparsity: final fraction of target weights pruned, in [0, 1); steps: pruning steps on
    the ``schedule`` ('exp', 'linear', 'cubic'); fisher/labels: curvature estimator and
    Fisher labels (None = the criterion's default); samples: labels drawn per example for
    'sampled'; lam: locality penalty; scope: 'global' or 'layer'; score_examples: training
    examples used to score (first N, fixed); finetune_epochs: fine-tuning after each step
    (0 = the paper's mode: all steps first); final_epochs: the last fine-tune; batch_size,
    optimizer, lr, momentum, weight_decay: fine-tuning; include/exclude: target name
    patterns; seed: every random choice; device: 'cpu', 'cuda' or 'auto'.
    """

    criterion: str = "obd"
    sparsity: float = 0.9
    steps: int = 10
    schedule: str = "exp"
    fisher: str | None = None
    labels: str | None = None
    samples: int = 1
    lam: float = 0.0
    scope: str = "global"
    score_examples: int = 1000
    finetune_epochs: float = 1.0
    final_epochs: float = 2.0
    batch_size: int = 100
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"

    def finetune_settings(self, epochs: float) -> FinetuneSettings:
        """The fine-tuning phase settings for ``epochs`` epochs."""
        return FinetuneSettings(
            epochs=epochs,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


@dataclass
class PruneResult:
    """The pruned model (in place), its masks (True = keep) and the report dict."""

    model: nn.Module
    masks: Masks
    report: dict
    metrics: list[dict] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (cuda when available) as a torch.device."""
    if device not in DEVICES:
        raise choice_error("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' asked for but no CUDA GPU is available; use cpu")
    return torch.device(device)


def make_run_criterion(settings: PruneSettings):
    """The criterion object for ``settings`` (criterion defaults where fisher/labels are None)."""
    if settings.criterion not in CRITERIA:
        raise choice_error("criterion", settings.criterion, CRITERIA)
    overrides = {"lam": settings.lam, "samples": settings.samples}
    if settings.fisher is not None:
        overrides["fisher"] = settings.fisher
    if settings.labels is not None:
        overrides["labels"] = settings.labels
    return make_criterion(settings.criterion, **overrides)


def resolved_labels(crit, task: Task) -> str:
    """The Fisher labels a criterion will use on ``task`` (its own, or its estimator's default)."""
    from prunekit.criteria.curvature import default_labels

    return crit.labels if crit.labels is not None else default_labels(crit.fisher, task)


def validate(settings: PruneSettings, model: nn.Module, data: DataBundle, task: Task):
    """Check every setting against model and data before any long work.

    Returns (criterion, schedule values, targets). Raises PrunekitError subclasses.
    """
    crit = make_run_criterion(settings)
    if crit.uses_curvature:
        check_labels(resolved_labels(crit, task), task, crit.samples)
    sparsities = schedule(settings.sparsity, settings.steps, settings.schedule)
    if settings.scope not in SCOPES:
        raise choice_error("scope", settings.scope, SCOPES)
    if settings.score_examples < 1 or settings.batch_size < 1:
        raise SettingError("score_examples and batch_size must be >= 1")
    settings.finetune_settings(settings.finetune_epochs)
    settings.finetune_settings(settings.final_epochs)
    targets = find_targets(model, settings.include, settings.exclude)
    check_data_fits(model, data)
    return crit, sparsities, targets


def _eval(model: nn.Module, task: Task, data: DataBundle) -> dict:
    return evaluate(model, task, data.val_batches())


def _param_counts(model: nn.Module, targets: dict[str, Target]) -> dict[str, int]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    zeros_all = sum(int((p == 0).sum()) for p in params.values())
    prunable = sum(params[n].numel() for n in targets)
    zeros = sum(int((params[n] == 0).sum()) for n in targets)
    return {"total": total, "prunable": prunable, "zeros": zeros, "zeros_all": zeros_all}


def _score_step(crit, model, task, targets, batches, gen, progress, step, steps):
    result = crit.evaluate(model, task, targets, batches, generator=gen)
    if progress:
        progress("score", step, steps)
    return result


def _finetune_phase(model, task, data, settings, epochs, masks, gen, progress, label) -> dict:
    if epochs <= 0:
        return {"steps": 0, "seconds": 0.0, "loss": math.nan}
    phase = settings.finetune_settings(epochs)
    batches = data.train_batches(settings.batch_size, gen)
    tick = (lambda done, total: progress(label, done, total)) if progress else None
    return finetune(model, task, batches, phase, masks=masks, progress=tick)


def _step_row(step, model, task, data, masks, after_prune, seconds) -> dict:
    after = _eval(model, task, data)
    global_sparsity, per_layer = sparsity_of(masks)
    return {
        "step": step,
        "sparsity": global_sparsity,
        "per_layer": per_layer,
        "loss_after_prune": after_prune["loss"],
        "accuracy_after_prune": after_prune["accuracy"],
        "loss_after_finetune": after["loss"],
        "accuracy": after["accuracy"],
        "seconds": seconds,
        "ntk_alignment": None,
    }


def run_pruning(
    model: nn.Module,
    data: DataBundle,
    settings: PruneSettings,
    task: Task | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` in place following ``settings``; return masks, metrics and report.

    Every setting is validated against the model and the data before any long work.
    """
    start = time.perf_counter()
    task = task or make_task(data.kind)
    device = resolve_device(settings.device)
    model.to(device)
    crit, sparsities, targets = validate(settings, model, data, task)
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    score_batches = [batch_to(b, device) for b in data.first_train(settings.score_examples)]
    params = dict(model.named_parameters())
    masks = full_masks({n: params[n] for n in targets})
    dense = _eval(model, task, data)
    rows = [
        {
            "step": 0,
            "sparsity": 0.0,
            "per_layer": {n: 0.0 for n in targets},
            "loss_after_prune": dense["loss"],
            "accuracy_after_prune": dense["accuracy"],
            "loss_after_finetune": dense["loss"],
            "accuracy": dense["accuracy"],
            "seconds": 0.0,
            "ntk_alignment": None,
        }
    ]
    estimators: dict[str, str] = {}
    for k, target in enumerate(sparsities, start=1):
        t0 = time.perf_counter()
        scored = _score_step(
            crit, model, task, targets, score_batches, gen, progress, k, len(sparsities)
        )
        estimators = scored.estimators or estimators
        masks = next_masks(scored.scores, masks, target, settings.scope)
        apply_masks(model, masks)
        pruned = _eval(model, task, data)
        _finetune_phase(
            model,
            task,
            data,
            settings,
            settings.finetune_epochs,
            masks,
            gen,
            progress,
            f"fine-tune step {k}",
        )
        rows.append(_step_row(k, model, task, data, masks, pruned, time.perf_counter() - t0))
        log.info(
            "step %d/%d sparsity %.4f loss %.4f",
            k,
            len(sparsities),
            target,
            rows[-1]["loss_after_finetune"],
        )
        if progress:
            progress("steps", k, len(sparsities))
    _finetune_phase(
        model, task, data, settings, settings.final_epochs, masks, gen, progress, "final fine-tune"
    )
    finetuned = _eval(model, task, data)
    report = build_report(
        settings,
        crit,
        task,
        model,
        targets,
        masks,
        rows,
        estimators,
        {"dense": dense, "pruned": pruned, "finetuned": finetuned},
        time.perf_counter() - start,
    )
    return PruneResult(model, masks, report, rows)


def build_report(settings, crit, task, model, targets, masks, rows, estimators, metrics, seconds):
    """report.json content (design.md section 6 keys, plus settings and counts)."""
    global_sparsity, per_layer = sparsity_of(masks)
    counts = _param_counts(model, targets)
    return {
        "criterion": settings.criterion,
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
        },
        "params": counts,
        "metrics": metrics,
        "steps": [
            {
                k: r[k]
                for k in (
                    "step",
                    "sparsity",
                    "loss_after_prune",
                    "loss_after_finetune",
                    "accuracy",
                    "seconds",
                    "ntk_alignment",
                )
            }
            for r in rows[1:]
        ],
        "seconds": seconds,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
        },
    }


def resolve_data(data, seed: int = 0) -> DataBundle:
    """A DataBundle from a spec string, a DataBundle, or an iterable of (inputs, targets)."""
    from prunekit.data import bundle_from_batches, load_data

    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        return load_data(data, seed=seed)
    return bundle_from_batches(data, seed=seed)


def write_run(out, result: PruneResult, arch: str | None, data_name: str) -> list:
    """Write the run directory of design.md section 6 (each file atomically)."""
    from pathlib import Path

    from prunekit.checkpoint import ARCH_KEY
    from prunekit.prune.state import save_masks, save_tensors, write_json, write_jsonl

    out = Path(out)
    meta = {
        "prunekit.criterion": result.report["criterion"],
        "prunekit.sparsity": f"{result.report['sparsity']['global']:.6f}",
        "prunekit.data": data_name,
        "prunekit.step": str(len(result.report["steps"])),
    }
    if arch:
        meta[ARCH_KEY] = arch
    state = result.model.state_dict()
    return [
        save_tensors(out / "model.safetensors", state, meta),
        save_masks(out / "masks.safetensors", result.masks, meta),
        write_jsonl(out / "metrics.jsonl", result.metrics),
        write_json(out / "report.json", result.report),
    ]


def train_example(name: str, seed: int = 0, progress: Progress | None = None):
    """Train the zoo example ``name`` on its bundled data.

    Returns (model, arch spec, data name, validation metrics dict).
    """
    from prunekit.checkpoint import build_model
    from prunekit.data import load_data
    from prunekit.models import EXAMPLES

    if name not in EXAMPLES:
        raise choice_error("example", name, EXAMPLES)
    ex = EXAMPLES[name]
    torch.manual_seed(seed)
    data = load_data(ex.data, seed=seed)
    model = build_model(ex.arch)
    check_data_fits(model, data)
    task = make_task(data.kind)
    gen = torch.Generator().manual_seed(seed)
    phase = FinetuneSettings(epochs=ex.epochs, lr=ex.lr, lr_schedule="cosine")
    tick = (lambda done, total: progress("train", done, total)) if progress else None
    finetune(model, task, data.train_batches(100, gen), phase, progress=tick)
    return model, ex.arch, ex.data, _eval(model, task, data)


def _settings_from(kwargs: dict) -> PruneSettings:
    known = set(PruneSettings.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SettingError(f"unknown settings {unknown}; valid: {', '.join(sorted(known))}")
    return PruneSettings(**kwargs)


def prune(model: nn.Module, data, task: Task | None = None, out=None, **settings) -> PruneResult:
    """Python API of `prunekit prune`: prune ``model`` in place.

    data: a spec string ('digits', 'mnist5k', 'synthetic', 'file.npz', 'module:function'),
    a DataBundle, or an iterable of (inputs, targets) batches; settings: PruneSettings
    fields (criterion, sparsity, steps, ...); out: optional run directory to write.
    """
    cfg = _settings_from(settings)
    bundle = resolve_data(data, seed=cfg.seed)
    result = run_pruning(model, bundle, cfg, task=task)
    if out is not None:
        write_run(out, result, None, bundle.name)
    return result


def _scoring_inputs(model, data, task, examples: int, include=(), exclude=()):
    bundle = resolve_data(data)
    task = task or make_task(bundle.kind)
    check_data_fits(model, bundle)
    targets = find_targets(model, tuple(include), tuple(exclude))
    return bundle.first_train(examples), task, targets


def score(
    model: nn.Module,
    data,
    criterion: str = "obd",
    task: Task | None = None,
    examples: int = 1000,
    seed: int = 0,
    **settings,
) -> dict[str, torch.Tensor]:
    """Scores (higher = keep) of every target weight; settings are the criterion's fields."""
    crit = make_criterion(criterion, **settings)
    batches, task, targets = _scoring_inputs(model, data, task, examples)
    gen = torch.Generator().manual_seed(seed)
    return crit.evaluate(model, task, targets, batches, generator=gen).scores


def fisher_diagonal(
    model: nn.Module,
    data,
    estimator: str = "ekfac",
    labels: str | None = None,
    task: Task | None = None,
    examples: int = 1000,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fisher diagonal of every target weight, shaped like it (float32).

    estimator: 'ekfac', 'kfac' or 'diag' (the structure); labels: 'exact', 'sampled' or
    'empirical' (where the gradient's labels come from; None = the estimator's default).
    """
    from prunekit.criteria import fit_curvature
    from prunekit.criteria.curvature import default_labels

    batches, task, targets = _scoring_inputs(model, data, task, examples)
    labels = labels or default_labels(estimator, task)
    check_labels(labels, task, samples)
    gen = torch.Generator().manual_seed(seed)
    curvature = fit_curvature(
        estimator, model, task, targets, batches, labels=labels, samples=samples, generator=gen
    )
    return curvature.diagonal()


def export_model(
    model: nn.Module,
    path,
    data: DataBundle,
    masks: Masks | None = None,
    storage: str = "packed",
    quantize: str | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    receipt_path=None,
) -> dict:
    """Export ``model`` to ONNX at ``path``, verified on the validation split; write export.json.

    The receipt goes to ``receipt_path`` (default: export.json beside the ONNX file).
    """
    from pathlib import Path

    from prunekit.export import export_onnx, write_receipt

    path = Path(path)
    x_val = data.x_val[:512]
    y_val = data.y_val[:512] if data.kind == "classification" else None
    receipt = export_onnx(
        model,
        path,
        example_input=x_val[:8],
        storage=storage,
        quantize=quantize,
        opset=opset,
        masks=masks,
        verify_inputs=x_val,
        verify_targets=y_val,
        overwrite=overwrite,
    )
    write_receipt(receipt, Path(receipt_path) if receipt_path else path.with_name("export.json"))
    return receipt
