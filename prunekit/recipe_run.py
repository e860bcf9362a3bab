"""Recipes at work: check, explain and run a resolved recipe (the schema is prunekit.recipe).

``load_checked_recipe`` validates a YAML file against the schema with the registries'
names; ``validate_recipe`` checks its settings and resolves its targets on the meta device
(no weights, no data, no training); ``explain_recipe`` gives the step timeline without
compute; ``run_recipe`` trains or loads the model, runs the loop with a checkpoint per
step (resumable), writes the run directory, exports (``model.onnx`` and its receipt
``model.onnx.json``, tried by a dry export before the run) and evaluates the recipe's checks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# Module references, not their functions: validation must provably never load weights or
# data, and the tests prove it by replacing checkpoint.load_model / data.load_data.
from prunekit import checkpoint as checkpoints
from prunekit import data as data_specs
from prunekit.analysis import log_spaced_iterations
from prunekit.api import check_export, export_forward, export_model, train_example
from prunekit.criteria.curvature import ESTIMATORS
from prunekit.criteria.fisher import LABELS
from prunekit.errors import CheckpointError, SettingError, choice_error, first_line
from prunekit.export.modes import QuantizationRefused
from prunekit.finetune import AUTO, LR_CANDIDATES, LR_SCHEDULES, OPTIMIZERS, PROBE_STEPS
from prunekit.loop import run_pruning
from prunekit.models import EXAMPLES
from prunekit.obsupdate import HELD_OUT, MAX_GROUPS
from prunekit.preflight import check_step_modes
from prunekit.prune.masks import SCOPES
from prunekit.prune.schedules import SCHEDULES, schedule
from prunekit.prune.state import write_json
from prunekit.prune.targets import find_targets
from prunekit.recipe import evaluate_checks, load_recipe, recipe_hash
from prunekit.report import write_run
from prunekit.resume import has_checkpoint
from prunekit.settings import (
    AUTO_CRITERION,
    DAMPED_UPDATES,
    STRUCTURES,
    UPDATES,
    Progress,
    PruneSettings,
    criterion_choices,
    make_run_criterion,
)
from prunekit.tasks import DISTILL_METRICS, LOSSES, load_task
from prunekit.trust import check_file_spec


def recipe_choices() -> dict:
    """Registry name -> valid names, for recipe validation (the CLI's choices too)."""
    from prunekit.export import QUANTIZE_MODES, STORAGE_MODES  # onnx: only when validating

    return {
        "loss": LOSSES,
        "distill_metric": DISTILL_METRICS,
        "criterion": criterion_choices(),
        "fisher": ESTIMATORS,
        "labels": LABELS,
        "scope": SCOPES,
        "schedule": SCHEDULES,
        "optimizer": OPTIMIZERS,
        "lr_schedule": LR_SCHEDULES,
        "update": UPDATES,
        "structure": STRUCTURES,
        "storage": STORAGE_MODES,
        "quantize": QUANTIZE_MODES,
    }


def load_checked_recipe(path, overrides=()) -> dict:
    """Load a recipe (schema, types, ranges and registry names, with line numbers)."""
    return load_recipe(path, list(overrides), choices=recipe_choices())


def settings_from_recipe(recipe: dict) -> PruneSettings:
    """PruneSettings of a resolved recipe (see prunekit.recipe.SCHEMA)."""
    crit, sched, ft, an = (recipe[k] for k in ("criterion", "schedule", "finetune", "analysis"))
    return PruneSettings(
        criterion=crit["name"],
        sparsity=sched["final"],
        steps=sched["steps"],
        schedule=sched["kind"],
        fisher=crit["fisher"],
        labels=crit["labels"],
        samples=crit["samples"],
        lam=float(crit["lambda"]),
        scope=crit["scope"],
        score_examples=crit["score_examples"],
        score_batch_size=crit["score_batch_size"],
        finetune_epochs=float(ft["epochs_per_step"]),
        final_epochs=float(ft["final_epochs"]),
        batch_size=ft["batch_size"],
        optimizer=ft["optimizer"],
        lr=ft["lr"] if isinstance(ft["lr"], str) else float(ft["lr"]),  # 'auto' or a number
        momentum=float(ft["momentum"]),
        weight_decay=float(ft["weight_decay"]),
        include=tuple(recipe["targets"]["include"]),
        exclude=tuple(recipe["targets"]["exclude"]),
        embeddings=recipe["targets"]["embeddings"],
        seed=recipe["seed"],
        refit_basis_every=crit["refit_basis_every"],
        refit_basis_below=crit["refit_basis_below"],
        masked_scaling=crit["masked_scaling"],
        compensate=crit["compensate"],
        update=crit["update"],
        shots=crit["shots"],
        structure=crit["structure"],
        lr_schedule=ft["lr_schedule"],
        distill_weight=float(ft["distill_weight"]),
        recalibrate_bn=recipe["finetune"]["recalibrate_bn"],
        ntk=an["ntk"],
        ntk_every=an["ntk_every"],
        loss=recipe["task"]["loss"],
        distill_metric=recipe["task"]["distill_metric"],
        temperature=float(recipe["task"]["temperature"]),
        task_spec=recipe["task"]["spec"],
    )


def recipe_model(recipe: dict, progress: Progress | None = None, train: bool = True):
    """(model, arch spec) of a recipe: a trained zoo example or a loaded checkpoint.

    train=False builds the example's architecture untrained (for resume and validation).
    """
    spec = recipe["model"]
    if spec["example"]:
        if spec["example"] not in EXAMPLES:
            raise choice_error("model.example", spec["example"], EXAMPLES)
        if not train:
            arch = EXAMPLES[spec["example"]].arch
            return checkpoints.build_model(arch), arch
        model, arch, _, _ = train_example(spec["example"], seed=recipe["seed"], progress=progress)
        return model, arch
    loaded = checkpoints.load_model(spec["checkpoint"], arch=spec["arch"])
    return loaded.model, loaded.arch


def run_recipe(
    recipe: dict, out, resume: bool = False, progress: Progress | None = None, final=None
):
    """Run a resolved recipe into run directory ``out``; returns (report, checks rows).

    Every finished step is checkpointed under out/state; with ``resume`` the run
    continues from there (a changed recipe is refused). Export and checks come last.
    final: where ``out`` will be published (the CLI writes into a work folder first); the
    export receipt names the model file there.
    """
    out = Path(out)
    validate_recipe(recipe)  # every setting before any training or data loading
    settings = settings_from_recipe(recipe)
    data = data_specs.load_data(recipe["data"], seed=recipe["seed"])
    has_state = resume and has_checkpoint(out)
    model, arch = recipe_model(recipe, progress, train=not has_state)
    forward = _export_forward(recipe, model, data)  # a dry export: before the run, not after
    info = {"recipe_hash": recipe_hash(recipe), "recipe": recipe}
    result = run_pruning(
        model, data, settings, progress=progress, state_dir=out, resume=resume, state_info=info
    )
    write_run(out, result, arch, recipe["data"])
    receipt, refused = None, None
    if recipe["export"]["enabled"]:
        try:
            receipt = export_model(
                result.model,
                out / "model.onnx",
                data,
                masks=result.masks,
                storage=recipe["export"]["storage"],
                quantize=recipe["export"]["quantize"],
                overwrite=True,
                published_path=Path(final) / "model.onnx" if final is not None else None,
                forward=forward,
                structure=settings.structure,
                max_accuracy_drop=recipe["export"]["max_accuracy_drop"],
                seed=recipe["seed"],
            )  # its receipt: model.onnx.json beside it
        except QuantizationRefused as exc:  # the run is kept, its report says why
            refused = exc
    checks = evaluate_checks(recipe["checks"], result.report, receipt)
    result.report["checks"] = checks
    result.report["recipe"] = {"name": recipe["name"], "hash": info["recipe_hash"]}
    if refused is not None:
        result.report["export_refused"] = str(refused)
    write_json(out / "report.json", result.report)
    if refused is not None:
        raise refused
    return result.report, checks


def _export_forward(recipe: dict, model: nn.Module, data):
    """How the recipe's export feeds the model (its task's argument mapping), after a dry
    export of the model as it is on 2 examples; None when the recipe does not export."""
    if not recipe["export"]["enabled"]:
        return None
    spec = recipe["task"]["spec"]
    forward = export_forward(data, load_task(spec) if spec else None, recipe["task"]["loss"])
    storage, quantize = recipe["export"]["storage"], recipe["export"]["quantize"]
    limit = recipe["export"]["max_accuracy_drop"]
    check_export(
        model, data, storage=storage, quantize=quantize, forward=forward, max_accuracy_drop=limit
    )
    return forward


def _meta_model(recipe: dict) -> nn.Module | None:
    """The recipe's architecture built on the meta device (no weights, no compute)."""
    spec = recipe["model"]
    arch = spec["arch"]
    if spec["example"]:
        if spec["example"] not in EXAMPLES:
            raise choice_error("model.example", spec["example"], EXAMPLES)
        arch = EXAMPLES[spec["example"]].arch
    elif not Path(spec["checkpoint"]).is_file():
        raise SettingError(f"model.checkpoint {spec['checkpoint']!r} does not exist")
    elif arch is None and spec["checkpoint"].endswith(".safetensors"):
        arch = _stored_arch(spec["checkpoint"])
    if arch is None:
        return None  # TorchScript or pickle: targets are known only once loaded
    with torch.device("meta"):
        return checkpoints.build_model(arch)


def _stored_arch(path: str) -> str | None:
    """The arch in a checkpoint's metadata, allowed by the trust policy; CheckpointError for a
    file that is not safetensors."""
    try:
        with safe_open(path, framework="pt") as f:
            arch = (f.metadata() or {}).get(checkpoints.ARCH_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"model.checkpoint {path!r} cannot be read as safetensors: {first_line(exc)}"
        ) from exc
    if arch:
        check_file_spec("arch", arch, f"the metadata of {path!r}")
    return arch


def validate_recipe(recipe: dict) -> dict:
    """Check a resolved recipe's settings and resolve its targets on the meta device.

    Returns {'targets': name -> numel (None if the model can't be built without loading),
    'steps': schedule values}. Raises PrunekitError subclasses naming the bad value.
    """
    settings = settings_from_recipe(recipe)
    check_step_modes(settings, make_run_criterion(settings))  # update, shots, structure
    sparsities = schedule(settings.sparsity, settings.steps, settings.schedule)
    if settings.scope not in SCOPES:
        raise choice_error("scope", settings.scope, SCOPES)
    settings.finetune_settings(settings.finetune_epochs)
    settings.finetune_settings(settings.final_epochs)
    log_spaced_iterations(10, settings.ntk_every)  # raises on a malformed schedule
    if recipe["export"]["enabled"]:
        from prunekit.export import check_modes  # onnx: only for a recipe that exports

        check_modes(recipe["export"]["storage"], recipe["export"]["quantize"])
    _check_recipe_task(recipe)
    model = _meta_model(recipe)
    targets = None
    if model is not None:
        found = find_targets(model, settings.include, settings.exclude, settings.embeddings)
        targets = {n: t.numel for n, t in found.items()}
    return {"targets": targets, "steps": sparsities}


def _check_recipe_task(recipe: dict) -> None:
    """The task section and the gates it makes measurable, in the recipe's own keys."""
    task, checks = recipe["task"], recipe["checks"]
    distill = task["loss"] == "distill"
    if not distill and (task["distill_metric"] != "auto" or task["temperature"] != 1.0):
        raise SettingError(
            "task.distill_metric and task.temperature only apply with task.loss: distill, "
            f"not {task['loss']!r}"
        )
    if task["spec"] is not None:
        load_task(task["spec"])  # imports now: a typo fails here, not after training
        if task["loss"] not in ("auto", "distill"):
            raise SettingError(
                f"task.loss {task['loss']!r} would replace the loss of task.spec; use auto "
                "(the spec's loss) or distill"
            )
    if checks["min_cosine"] is not None and not distill:
        raise SettingError("checks.min_cosine is measured only with task.loss: distill")
    if checks["max_accuracy_drop"] is not None and distill and task["distill_metric"] in (
        "mse", "cosine",
    ):  # fmt: skip
        raise SettingError(
            f"checks.max_accuracy_drop needs accuracy, which distillation with "
            f"{task['distill_metric']!r} does not measure; use checks.min_cosine"
        )


def _label_terms(crit, classes: int) -> int:
    labels = crit.labels
    if labels == "exact":
        return classes
    return crit.samples if labels == "sampled" else 1


def _lr_probe_cost(settings: PruneSettings, data, totals: dict) -> list[str]:
    """With lr 'auto': add the probe's passes to ``totals``; the note that explains them."""
    if settings.lr != AUTO or (settings.finetune_epochs <= 0 and settings.final_epochs <= 0):
        return []
    train = len(LR_CANDIDATES) * PROBE_STEPS * min(settings.batch_size, data.n_train)
    totals["finetune_forward"] += train + len(LR_CANDIDATES) * data.n_val
    totals["finetune_backward"] += train
    return [
        f"lr auto: {len(LR_CANDIDATES)} rates x {PROBE_STEPS} batches probed at the first "
        f"fine-tune, each then evaluated on {data.n_val} validation examples (counted)"
    ]


def basis_fit_steps(
    sparsities: list[float], below: float, every: int, total: int | None = None
) -> list[bool]:
    """Which steps fit a new EKFAC eigenbasis (``curvature._fit_ekfac_cached``'s rule):
    step 1, every ``every``-th step, and a step whose kept fraction (1 - the sparsity
    before it; with ``total`` target weights, of the rounded count the masks keep) is at
    most ``below`` times the kept fraction at the last fit."""
    fits, last = [], 1.0
    for i in range(len(sparsities)):
        gone = sparsities[i - 1] if i else 0.0
        kept = 1.0 - (round(gone * total) / total if total else gone)
        due = i == 0 or (every > 0 and i % every == 0) or (below > 0 and kept <= below * last)
        last = kept if due else last
        fits.append(due)
    return fits


def explain_recipe(recipe: dict) -> dict:
    """The step timeline of a recipe without any training or scoring.

    Returns {'rows': [...], 'totals': {...}, 'notes': [...]}; each row has step, sparsity
    (global, over targets), kept weights, per-layer sparsity for layer scope, fine-tuning
    epochs, and estimated example-passes (forward / backward) for scoring and fine-tuning.
    """
    checked = validate_recipe(recipe)
    settings = settings_from_recipe(recipe)
    crit = make_run_criterion(settings)
    data = data_specs.load_data(recipe["data"], seed=recipe["seed"])
    n_train, n_score = data.n_train, min(settings.score_examples, data.n_train)
    total = sum(checked["targets"].values()) if checked["targets"] else None
    terms = _label_terms(crit, max(data.num_classes, 1)) if crit.uses_curvature else 0
    rows = []
    ekfac = crit.uses_curvature and crit.fisher == "ekfac"
    fits = basis_fit_steps(
        checked["steps"], settings.refit_basis_below, settings.refit_basis_every, total
    )
    for k, s in enumerate(checked["steps"], start=1):
        passes = 2 if ekfac and fits[k - 1] else 1  # a new basis: factor pass + scaling pass
        inputs_only = getattr(crit, "uses_inputs", False) and not crit.uses_gradient
        score_fwd = n_score * (
            int(crit.uses_gradient or inputs_only) + passes * int(crit.uses_curvature)
        )
        score_bwd = n_score * (int(crit.uses_gradient) + passes * terms)
        if getattr(crit, "reconstructs", False):  # one calibration forward per target layer
            score_fwd += n_score * len(checked["targets"] or {})
        score_fwd, score_bwd = score_fwd * settings.shot_count, score_bwd * settings.shot_count
        ft = settings.finetune_epochs * n_train
        rows.append(
            {
                "step": k,
                "sparsity": s,
                "kept": None if total is None else total - round(s * total),
                "per_layer": s if settings.scope == "layer" else None,
                "finetune_epochs": settings.finetune_epochs,
                "score_forward": score_fwd,
                "score_backward": score_bwd,
                "finetune_forward": ft,
                "finetune_backward": ft,
            }
        )
    final_ft = settings.final_epochs * n_train
    totals = {
        key: sum(r[key] for r in rows)
        for key in ("score_forward", "score_backward", "finetune_forward", "finetune_backward")
    }
    totals["finetune_forward"] += final_ft
    totals["finetune_backward"] += final_ft
    notes = _lr_probe_cost(settings, data, totals) + [
        f"{n_train} training examples, {n_score} scored; final fine-tune "
        f"{settings.final_epochs:g} epochs; passes counted per example"
    ]
    if settings.scope == "global":
        notes.append("global scope: per-layer sparsity depends on the scores (known after run)")
    if ekfac:
        steps = ", ".join(str(k) for k, fit in enumerate(fits, start=1) if fit)
        notes.append(f"EKFAC eigenbasis fitted at step(s) {steps}, otherwise only its scaling "
                     "(a factor pass more at those steps, counted)")  # fmt: skip
    if settings.shot_count > 1:
        auto = " (auto: no fine-tuning)" if settings.shots == 0 else ""
        notes.append(
            f"shots {settings.shot_count}{auto}: every step scores {settings.shot_count} times "
            "(counted)"
        )
    if settings.update_mode in DAMPED_UPDATES:
        notes.append(
            f"{settings.update_mode} update: per step, 1 + 3 evaluations per group of factored "
            f"layers (one layer each, at most {MAX_GROUPS} groups) of up to {HELD_OUT} validation "
            "examples choose the damping (not counted)"
        )
    if settings.criterion == AUTO_CRITERION:
        notes.append(f"criterion auto: {settings.criterion_name}, update {settings.update_mode}")
    if settings.loss == "distill":
        notes.append(
            f"distillation: one forward pass of the dense model over all "
            f"{data.n_train + data.n_val} examples first (targets, cached in the run)"
        )
    return {"rows": rows, "totals": totals, "notes": notes, "targets": checked["targets"]}
