"""Check every setting against the model, the task and the data before any long work.

A run that cannot work fails here in one line (a PrunekitError naming the bad value and
what would be valid), not after minutes of scoring or fine-tuning.
"""

from __future__ import annotations

from torch import nn

from prunekit.analysis import log_spaced_iterations
from prunekit.criteria.fisher import check_labels
from prunekit.data import DataBundle, check_data_fits
from prunekit.errors import DataError, SettingError, choice_error
from prunekit.finetune import checkpoint_iterations, lr_setting
from prunekit.limits import check_bound
from prunekit.prune.masks import SCOPES
from prunekit.prune.schedules import schedule
from prunekit.prune.targets import find_targets
from prunekit.settings import (
    REFIT_BELOW_DEFAULT,
    STRUCTURES,
    UPDATES,
    PruneSettings,
    make_run_criterion,
    resolved_labels,
)
from prunekit.tasks import UserTask
from prunekit.types import Task


def validate(settings: PruneSettings, model: nn.Module, data: DataBundle, task: Task):
    """Check every setting against model and data before any long work.

    Returns (criterion, schedule values, targets). Raises PrunekitError subclasses.
    """
    crit = make_run_criterion(settings)
    check_step_modes(settings, crit)
    check_data_fits(model, data, task)
    classes = data.num_classes if data.kind == "classification" else None
    labels = resolved_labels(crit, task, classes) if crit.uses_curvature else None
    check_no_idle_settings(settings, crit, labels)
    _check_distill_gradients(settings.criterion_name, crit, task, labels)
    if crit.uses_curvature:
        _check_label_source(labels, task, data, crit.samples)
    sparsities = schedule(settings.sparsity, settings.steps, settings.schedule)
    if settings.scope not in SCOPES:
        raise choice_error("scope", settings.scope, SCOPES)
    for name in ("score_examples", "score_batch_size", "batch_size"):
        if getattr(settings, name) < 1:
            raise SettingError(f"{name} must be >= 1, got {getattr(settings, name)!r}")
    lr_setting(settings.lr)  # 'auto' or a finite number > 0 (one line naming the value)
    settings.finetune_settings(settings.finetune_epochs)
    settings.finetune_settings(settings.final_epochs)
    checkpoint_iterations(1, settings.finetune_checkpoints)  # an integer >= 1
    log_spaced_iterations(10, settings.ntk_every)  # raises on a malformed schedule
    targets = find_targets(model, settings.include, settings.exclude, settings.embeddings)
    return crit, sparsities, targets


def check_step_modes(settings: PruneSettings, crit) -> None:
    """update, shots, structure and distill_weight: valid values, and combinations that work."""
    check_bound("shots", settings.shots, "--shots")  # an integer before shot_count reads it
    if settings.update not in UPDATES:
        raise choice_error("update", settings.update, UPDATES)
    if settings.structure not in STRUCTURES:
        raise choice_error("structure", settings.structure, STRUCTURES)
    if settings.structure == "units":
        idle = {"--shots": settings.shot_count > 1, "--update": settings.update_mode != "none"}
        idle[f"--criterion {settings.criterion_name}"] = getattr(crit, "reconstructs", False)
        for flag, used in idle.items():
            if used:
                raise SettingError(
                    f"{flag} applies to single weights; --structure units scores whole units "
                    "(obs compensates the next layer itself): drop one of them"
                )
    if settings.compensate and settings.update not in ("auto", "none", "summed"):
        raise SettingError(
            f"--compensate is --update summed; it contradicts --update {settings.update}"
        )
    mode = settings.update_mode
    reconstructs = getattr(crit, "reconstructs", False)
    if mode != "none" and reconstructs:
        raise SettingError(
            f"--update {mode} does nothing with criterion {settings.criterion_name!r}: it already "
            "updates the surviving weights (layer reconstruction); drop --update"
        )
    if mode != "none" and (not crit.uses_curvature or crit.fisher == "diag"):
        raise SettingError(
            f"--update {mode} needs a curvature criterion (obd, qm, obs) on kfac or ekfac, "
            f"not {settings.criterion_name!r} with fisher {crit.fisher!r}"
        )
    if settings.shot_count > 1 and settings.criterion_name == "magnitude" and mode == "none":
        raise SettingError(
            f"--shots {settings.shot_count} does nothing with criterion 'magnitude' (the "
            "weights do not change between shots); drop it, or choose a curvature criterion"
        )


def check_no_idle_settings(settings: PruneSettings, crit, labels: str | None) -> None:
    """Refuse a setting that would silently do nothing for the chosen criterion (e.g.
    ``--criterion magnitude --fisher ekfac``): a user who typed it expected an effect.

    labels: the Fisher labels the run will use (None for criteria without curvature)."""
    name = settings.criterion_name
    curvature = ("fisher", "labels") if not crit.uses_curvature else ()
    for key in curvature:
        if getattr(settings, key) is not None:
            flag = "--fisher" if key == "fisher" else "--fisher-labels"
            raise SettingError(
                f"{flag} {getattr(settings, key)!r} does nothing with criterion {name!r}, which "
                "uses no curvature; drop it, or choose a curvature criterion (obd, qm, obs)"
            )
    if settings.samples > 1 and labels != "sampled":
        raise SettingError(
            f"--fisher-samples {settings.samples} does nothing without --fisher-labels sampled "
            f"(criterion {name!r} uses labels {labels!r})"
        )
    ekfac_only = {"--refit-basis-every": settings.refit_basis_every, "--masked-scaling": None}
    ekfac_only["--masked-scaling"] = settings.masked_scaling or None
    if settings.refit_basis_below != REFIT_BELOW_DEFAULT:  # the default is for ekfac runs
        ekfac_only["--refit-basis-below"] = settings.refit_basis_below
    for flag, value in ekfac_only.items():
        if value and (not crit.uses_curvature or crit.fisher != "ekfac"):
            raise SettingError(
                f"{flag} {value!r} applies to the ekfac estimator only; criterion {name!r} "
                f"uses {crit.fisher if crit.uses_curvature else 'no curvature'!r}"
            )


def _check_distill_gradients(name: str, crit, task: Task, labels: str | None) -> None:
    """Distillation starts at its optimum: the loss gradient is exactly zero at the dense
    model, so gradient-only scores and the empirical Fisher would rank nothing."""
    if task.kind != "distill":
        return
    if crit.uses_gradient and not crit.uses_curvature:
        raise SettingError(
            f"criterion {name!r} scores the loss gradient, which is zero at the dense "
            "model under --loss distill (the student is the teacher); use obd, qm, obs or "
            "magnitude"
        )
    if labels == "empirical":
        raise SettingError(
            "Fisher labels 'empirical' under --loss distill are gradients of a loss that is "
            "zero at the dense model (every score 0); use --fisher-labels sampled or exact"
        )


def _check_label_source(labels: str, task: Task, data: DataBundle, samples: int) -> None:
    """The Fisher labels must exist for this task and data (one-line errors otherwise)."""
    if labels == "exact" and not task.categorical:
        raise SettingError(
            f"Fisher labels 'exact' need a categorical output (a classifier or --loss distill "
            f"with kl), not a {task.kind!r} task; use --fisher-labels sampled or empirical"
        )
    batch = data.first_train(1, 1)[0]
    if labels == "sampled":
        if not task.can_sample:
            raise SettingError(
                "Fisher labels 'sampled' need a task with sample(outputs, generator); "
                "use --fisher-labels empirical"
            )
        _check_label_slot(task, batch)
    if labels == "empirical":
        try:
            task.targets(batch)
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(
                f"Fisher labels 'empirical' need labels, and data {data.name!r} has inputs only "
                "(use --fisher-labels sampled with a task that has sample(), or --loss distill)"
            ) from exc
    check_labels(labels, task, samples)


def _check_label_slot(task: Task, batch) -> None:
    """Sampled labels reach the loss through ``task.with_targets``: for dict batches the
    default writes ``batch[task.label_key]``, which the batch must already hold."""
    if not isinstance(batch, dict):
        return
    if isinstance(task, UserTask):
        custom = callable(getattr(task.obj, "with_targets", None))
    else:
        custom = type(task).with_targets is not Task.with_targets
    key = task.label_key
    if not custom and key not in batch:
        raise SettingError(
            f"sampled Fisher labels are written to batch[{key!r}], which the dict batches "
            f"(keys {sorted(batch)}) lack; give the task a label_key naming its label entry "
            "or a with_targets(batch, targets) method"
        )
