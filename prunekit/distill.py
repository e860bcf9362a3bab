"""The run's task, and label-free distillation: the dense model's outputs become the targets.

``prepare_task`` picks the task (API object, ``--task`` spec, or the built-in one for the
data); with loss 'distill' it computes the teacher outputs once, on every input, and caches
them in the run's state folder keyed by sha256 of the dense weights and of the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from prunekit.data import DataBundle, check_data_fits
from prunekit.errors import SettingError
from prunekit.prune.state import save_tensors
from prunekit.settings import PruneSettings
from prunekit.tasks import (
    DistillationTask,
    as_task,
    base_task,
    check_distillable,
    load_task,
    resolve_metric,
)
from prunekit.types import Task, batch_to, num_rows, take_rows

log = logging.getLogger("prunekit")

TEACHER_FILE = "teacher.safetensors"


def _digest(named) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _fingerprints(model: nn.Module, data: DataBundle) -> dict[str, str]:
    """sha256 of the dense weights and of the data's inputs (split included): the keys of
    the teacher cache."""
    named = []
    for part, inputs in (("train", data.x_train), ("val", data.x_val)):
        columns = inputs if isinstance(inputs, dict) else {"x": inputs}
        named += [(f"{data.name}.{part}.{k}", v) for k, v in sorted(columns.items())]
    return {
        "prunekit.weights": _digest(sorted(model.state_dict().items())),
        "prunekit.inputs": _digest(named),
    }


def _cached_teacher(cache, keys: dict, resuming: bool) -> dict | None:
    """The cached outputs when their keys match (on resume the weights are no longer the
    dense ones, so only the inputs must match), else None."""
    if cache is None or not Path(cache).is_file():
        return None
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata() or {}
    wanted = ["prunekit.inputs"] + ([] if resuming else ["prunekit.weights"])
    if any(meta.get(k) != keys[k] for k in wanted):
        return None
    log.info("reusing the dense model's outputs from %s", cache)
    return load_file(str(cache))


@torch.no_grad()
def _outputs_on(model: nn.Module, task: Task, inputs, batch: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [
        task.forward(model, batch_to(take_rows(inputs, slice(i, i + batch)), device))
        .detach()
        .float()
        .cpu()
        for i in range(0, num_rows(inputs), batch)
    ]
    return torch.cat(outs)


def teacher_outputs(
    model: nn.Module, task: Task, data: DataBundle, cache=None, resuming: bool = False
) -> dict:
    """The dense model's outputs {'train', 'val'} (float32, CPU) on every input, eval mode.

    cache: a file path; its outputs are reused when they were made from the same weights
    and inputs (sha256 keys in the metadata), else computed and written there. resuming:
    ``model`` holds a checkpoint's pruned weights, so the cache must exist and only its
    inputs must match (SettingError otherwise).
    """
    keys = _fingerprints(model, data)
    cached = _cached_teacher(cache, keys, resuming)
    if cached is not None:
        return cached
    if resuming:
        raise SettingError(
            "cannot resume this distillation run: its dense outputs are missing or were made "
            "from other data; start a new run without --resume"
        )
    was_training = model.training
    model.eval()
    try:
        out = {"train": _outputs_on(model, task, data.x_train)}
        out["val"] = _outputs_on(model, task, data.x_val)
    finally:
        model.train(was_training)
    if cache is not None:
        save_tensors(Path(cache), out, {"prunekit.kind": "teacher", **keys})
    return out


def prepare_task(
    model, data: DataBundle, settings: PruneSettings, task=None, cache=None, resuming=False
):
    """(task, data, teacher outputs or None) for a run.

    task: a Task or user object given through the API (a ``DistillationTask`` sets the
    distillation settings), else ``settings.task_spec`` is imported, else the built-in task
    for ``settings.loss`` / the data's labels. With loss 'distill' the data's targets become
    {'teacher': the dense model's outputs (``teacher_outputs``, cached at ``cache``),
    'labels': class labels when the data has them (for accuracy)} and the task a
    ``DistillationTask`` whose base task runs the model on the inputs alone. resuming: the
    model holds a checkpoint's weights; the cached dense outputs are required.
    Raises PrunekitError subclasses (one line) for tasks or data that cannot work.
    """
    if isinstance(task, DistillationTask):
        settings = dataclasses.replace(
            settings, loss="distill", distill_metric=task.metric, temperature=task.temperature
        )
        task = task.base
    _check_distill_settings(settings)
    user = as_task(task) if task is not None else None
    if user is None and settings.task_spec:
        user = load_task(settings.task_spec)
    base = base_task(settings.loss, data.kind, user)
    if settings.loss == "distill":
        return _distillation(model, data, settings, base, cache, resuming)
    if settings.distill_weight > 0:  # mixed: the task's loss and the dense model's outputs
        return _distillation(model, data, settings, base, cache, resuming, supervised=base)
    return base, data, None


def _check_distill_settings(settings: PruneSettings) -> None:
    weight = settings.distill_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise SettingError(f"--distill-weight {weight!r} must be a number in [0, 1]")
    if settings.loss == "distill":
        if settings.distill_weight not in (0, 1):
            raise SettingError(
                f"--distill-weight {settings.distill_weight!r} mixes the data's labels with the "
                "dense outputs; --loss distill uses the dense outputs alone (drop one)"
            )
        return
    if settings.distill_weight > 0:
        return
    if settings.distill_metric != "auto" or settings.temperature != 1.0:
        raise SettingError(
            f"distill metric {settings.distill_metric!r} / temperature {settings.temperature!r} "
            f"only apply with --loss distill or --distill-weight > 0, not --loss {settings.loss}"
        )


def _distillation(
    model, data: DataBundle, settings: PruneSettings, base: Task, cache, resuming, supervised=None
):
    """The distillation task and data; ``supervised``: the task whose loss on the data's
    labels is mixed in at 1 - ``settings.distill_weight`` (None = distillation alone)."""
    inputs = data.inputs_only()  # the base task sees exactly what the run will feed it
    outputs = check_data_fits(model, inputs, base, loss=False)
    classes = data.num_classes if data.kind == "classification" else 0
    metric = resolve_metric(settings.distill_metric, classes, outputs)
    check_distillable(outputs, metric)
    weight = 1.0 - settings.distill_weight if supervised is not None else 0.0
    distill = DistillationTask(base, metric, settings.temperature, supervised, weight)
    teacher = teacher_outputs(model, base, inputs, cache, resuming)
    distill.fit_variance(teacher["train"])
    targets = {}
    for part, labels in (("train", data.y_train), ("val", data.y_val)):
        targets[part] = {"teacher": distill.prepare(teacher[part])}
        if classes or supervised is not None:
            targets[part]["labels"] = labels
    return distill, data.with_targets(targets["train"], targets["val"], "distill"), teacher
