"""Tasks beyond the built-in classifier and regressor: user tasks and label-free distillation.

``load_task('module:factory')`` imports a user's task; ``DistillationTask`` wraps any task
so that the targets are the dense model's own outputs (computed once, see
``teacher_outputs``): KL divergence at a temperature for logits, MSE or cosine for
embeddings. Its predictive distribution (for the true Fisher) is categorical
softmax(outputs / T) for KL, and a unit Gaussian around the outputs (MSE) or around the
unit-normalised outputs (cosine).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import DataError, SettingError, choice_error, first_line
from prunekit.types import (
    Batch,
    ExampleDraws,
    Task,
    batch_size,
    categorical_terms,
    make_task,
    sample_classes,
)

LOSSES = ("auto", "classification", "regression", "distill")
DISTILL_METRICS = ("auto", "kl", "mse", "cosine")
_PROTOCOL = ("forward", "loss")


class UserTask(Task):
    """A user object with ``forward`` and ``loss`` (and optional extras) seen as a Task.

    Methods the object lacks fall back to Task's defaults; ``kind`` is the object's
    ``kind`` attribute or 'custom'.
    """

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name
        self.kind = str(getattr(obj, "kind", "custom"))
        self.label_key = getattr(obj, "label_key", Task.label_key)

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The user's forward."""
        return self.obj.forward(model, batch)

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        """The user's scalar mean loss."""
        return self.obj.loss(outputs, batch)

    def example_losses(self, outputs: Any, batch: Batch) -> Tensor:
        """The user's ``nll(outputs, targets)`` if given, else ``loss * N`` (Task default)."""
        if hasattr(self.obj, "nll"):
            return self.obj.nll(outputs, self.targets(batch))
        return (self.loss(outputs, batch) * batch_size(batch)).reshape(1)

    @property
    def can_sample(self) -> bool:
        """True when the user's object has ``sample``."""
        return callable(getattr(self.obj, "sample", None))

    def sample(self, outputs: Any, generator: torch.Generator) -> Any:
        """The user's ``sample`` (SettingError if the object has none)."""
        if not self.can_sample:
            raise SettingError(f"task {self.name!r} has no sample(outputs, generator)")
        return self.obj.sample(outputs, generator)

    def targets(self, batch: Batch) -> Any:
        """The user's ``targets`` if given, else Task's default."""
        own = getattr(self.obj, "targets", None)
        return own(batch) if callable(own) else super().targets(batch)

    def with_targets(self, batch: Batch, targets: Any) -> Batch:
        """The user's ``with_targets`` if given, else Task's default."""
        own = getattr(self.obj, "with_targets", None)
        return own(batch, targets) if callable(own) else super().with_targets(batch, targets)

    def position_mask(self, batch: Batch) -> Tensor | None:
        """The user's ``position_mask`` if given, else the ``attention_mask`` entry."""
        own = getattr(self.obj, "position_mask", None)
        return own(batch) if callable(own) else super().position_mask(batch)

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, float]:
        """The user's ``metrics`` (sums over the batch) if given, else the loss sum."""
        own = getattr(self.obj, "metrics", None)
        if callable(own):
            return {k: float(v) for k, v in own(outputs, batch).items()}
        return super().metrics(outputs, batch)


def as_task(obj: Any, name: str = "task") -> Task:
    """``obj`` itself if it is a Task, a ``UserTask`` around it if it has forward and loss.

    Raises SettingError naming what is missing otherwise.
    """
    if isinstance(obj, Task):
        return obj
    missing = [m for m in _PROTOCOL if not callable(getattr(obj, m, None))]
    if missing:
        raise SettingError(
            f"task {name!r} returned {type(obj).__name__}, which lacks {', '.join(missing)}; "
            "a task needs forward(model, batch) and loss(outputs, batch)"
        )
    return UserTask(obj, name)


def load_task(spec: str) -> Task:
    """Import ``module:factory`` and call the factory (no arguments); returns a Task.

    Raises SettingError (one line) when the module or factory does not import, the call
    fails, or the result is not a task.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SettingError(f"task spec {spec!r} must look like module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SettingError(f"task {spec!r} does not import: {first_line(exc)}") from exc
    if not callable(factory):
        raise SettingError(f"task {spec!r} is not callable; it must be a factory function")
    try:
        obj = factory()
    except Exception as exc:  # a user's factory can fail in any way
        raise SettingError(f"task factory {spec!r} failed: {first_line(exc)}") from exc
    return as_task(obj, spec)


class DistillationTask(Task):
    """Match the dense model's outputs; batches are ``(inputs, targets)`` with targets the
    prepared teacher outputs, or a dict {'teacher': ..., 'labels': class labels}.

    base: the task whose ``forward`` runs the model on ``data_batch`` (labels, if any, are
    not used). metric: 'kl' (teacher and student logits (N, C), KL(p_T || p_S) at
    ``temperature`` T, loss scaled by T^2 as usual), 'mse' (mean squared error over output
    entries, divided by ``variance``, set by ``fit_variance`` to the teacher outputs' mean
    square so that one learning rate suits outputs of any scale) or 'cosine' (1 - cosine
    similarity of the flattened outputs). Teacher outputs are stored as given by
    ``prepare`` (raw outputs for kl and mse, unit vectors for cosine).
    """

    kind = "distill"

    def __init__(
        self,
        base: Task,
        metric: str = "kl",
        temperature: float = 1.0,
        supervised: Task | None = None,
        task_weight: float = 0.0,
    ):
        if metric not in DISTILL_METRICS[1:]:
            raise choice_error("distill metric", metric, DISTILL_METRICS)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature <= 0
        ):
            raise SettingError(f"distillation temperature must be > 0, got {temperature!r}")
        self.base, self.metric, self.temperature = base, metric, float(temperature)
        self.variance = 1.0
        if not 0.0 <= task_weight <= 1.0 or (task_weight > 0 and supervised is None):
            raise SettingError(
                f"task weight {task_weight!r} must be in [0, 1], with a supervised task when > 0"
            )
        self.supervised, self.task_weight = supervised, float(task_weight)

    def fit_variance(self, teacher: Tensor) -> float:
        """mse: the Gaussian's variance = mean square of the teacher outputs (N, ...)."""
        if self.metric == "mse":
            self.variance = max(float(teacher.detach().double().pow(2).mean()), 1e-12)
        return self.variance

    def forward(self, model: nn.Module, batch: Batch) -> Tensor:
        """The base task's forward on the data part of the batch."""
        return self.base.forward(model, batch[0])

    def targets(self, batch: Batch) -> Tensor:
        """The teacher's (prepared) outputs of the batch."""
        targets = batch[1]
        return targets["teacher"] if isinstance(targets, dict) else targets

    def position_mask(self, batch: Batch) -> Tensor | None:
        """The base task's padding mask of the data part."""
        return self.base.position_mask(batch[0])

    def prepare(self, teacher: Tensor) -> Tensor:
        """Teacher outputs as stored targets: (N, ...) float; unit rows for cosine."""
        teacher = teacher.detach().float().flatten(1)
        return F.normalize(teacher, dim=1) if self.metric == "cosine" else teacher

    def _student(self, outputs: Tensor) -> Tensor:
        flat = outputs.flatten(1)
        if self.metric == "cosine":
            return F.normalize(flat, dim=1)
        return flat / self.temperature if self.metric == "kl" else flat

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example NLL under the student's predictive distribution, shape (N,).

        kl: targets are class indices (sampled) or teacher logits (soft cross-entropy at
        temperature T); mse/cosine: 0.5 * squared distance to the targets (mse: over
        ``variance``).
        """
        student = self._student(outputs)
        if self.metric != "kl":
            sq = (student - targets.to(student.dtype)).pow(2).sum(1)
            return 0.5 * sq / (self.variance if self.metric == "mse" else 1.0)
        logp = torch.log_softmax(student, dim=1)
        if not targets.is_floating_point():
            return -logp.gather(1, targets.long().reshape(-1, 1)).squeeze(1)
        soft = torch.softmax(targets.to(student.dtype) / self.temperature, dim=1)
        return -(soft * logp).sum(1)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """kl: T^2 * mean KL; mse: mean squared error / variance; cosine: mean (1 - cos).

        With a ``task_weight`` w > 0: (1 - w) * that + w * the supervised task's loss on the
        batch's 'labels' (the data's own targets)."""
        distill = self._distill_loss(outputs, batch)
        if self.task_weight == 0.0:
            return distill
        labels = batch[1]["labels"]  # prepare_task stores them whenever the task is mixed
        own = self.supervised.loss(outputs, (batch[0], labels))
        return (1.0 - self.task_weight) * distill + self.task_weight * own

    def _distill_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        targets = self.targets(batch)
        if self.metric == "mse":
            return F.mse_loss(outputs.flatten(1), targets.to(outputs.dtype)) / self.variance
        if self.metric == "cosine":
            return self.nll(outputs, targets).mean()  # 0.5 |a - b|^2 = 1 - cos for unit rows
        logp = torch.log_softmax(self._student(outputs), dim=1)
        logq = torch.log_softmax(targets.to(logp.dtype) / self.temperature, dim=1)
        kl = (logq.exp() * (logq - logp)).sum(1)
        return kl.mean() * self.temperature**2

    @property
    def categorical(self) -> bool:
        """Exact Fisher available for kl (categorical softmax(outputs / T))."""
        return self.metric == "kl"

    def exact_terms(self, outputs: Tensor) -> list[Tensor]:
        """-sqrt(p_c) log p_c per class, p = softmax(outputs / T)."""
        return categorical_terms(self._student(outputs))

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        """kl: classes from softmax(outputs / T); mse: student + N(0, variance I) noise;
        cosine: unit-normalised student + N(0, I) noise."""
        student = self._student(outputs.detach()).float()
        if self.metric == "kl":
            return sample_classes(student, generator)
        noise = torch.randn(student.shape, generator=generator, dtype=student.dtype)
        scale = math.sqrt(self.variance) if self.metric == "mse" else 1.0
        return (student + scale * noise.to(student.device)).to(outputs.dtype)

    def sample_examples(self, outputs: Tensor, draws: ExampleDraws) -> Tensor:
        """``sample`` vectorised over the batch, example i from its own keyed draws: the
        same distributions, one draw for the whole batch instead of a loop."""
        student = self._student(outputs.detach()).float()
        if self.metric == "kl":
            return draws.categorical(torch.softmax(student, dim=-1))
        noise = draws.normal(tuple(student.shape[1:]), student.device).to(student.dtype)
        scale = math.sqrt(self.variance) if self.metric == "mse" else 1.0
        return (student + scale * noise).to(outputs.dtype)

    def metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        """Sums: ``loss`` (the training loss per example), ``cosine`` similarity to the
        teacher's outputs and, for kl, ``agreement`` (same top-1 class as the teacher) and
        ``correct`` (top-1 = the data's label, when the batch carries labels)."""
        targets = self.targets(batch)
        n = batch_size(batch)
        out = {"loss": float(self.loss(outputs, batch)) * n}
        flat = outputs.flatten(1).float()
        out["cosine"] = float(F.cosine_similarity(flat, targets.float(), dim=1).sum())
        if self.metric == "kl":
            out["agreement"] = float((flat.argmax(1) == targets.argmax(1)).sum())
            labels = batch[1].get("labels") if isinstance(batch[1], dict) else None
            if labels is not None:
                out["correct"] = float((flat.argmax(1) == labels).sum())
        return out


def check_distillable(outputs: Any, metric: str) -> None:
    """DataError (one line) unless ``outputs`` is a float tensor (N, ...) ``metric`` can compare.

    kl needs logits of shape (N, C) with C >= 2.
    """
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
        what = type(outputs).__name__ if not isinstance(outputs, Tensor) else str(outputs.dtype)
        raise DataError(
            f"--loss distill needs a model that returns one floating-point tensor, not {what}; "
            "wrap the model or give a --task whose forward returns a tensor"
        )
    if outputs.dim() < 2 or outputs[0].numel() < 1:
        raise DataError(
            f"--loss distill needs outputs shaped (N, ...) per example, got {tuple(outputs.shape)}"
        )
    if metric == "kl" and (outputs.dim() != 2 or outputs.shape[1] < 2):
        raise DataError(
            f"--distill-metric kl needs logits (N, C >= 2), got {tuple(outputs.shape)}; "
            "use --distill-metric mse or cosine for embeddings"
        )


def resolve_metric(metric: str, classes: int, outputs: Any) -> str:
    """'auto' -> 'kl' when the outputs are logits over the data's classes (N, classes > 0),
    else 'cosine' (embeddings)."""
    if metric not in DISTILL_METRICS:
        raise choice_error("distill metric", metric, DISTILL_METRICS)
    if metric != "auto":
        return metric
    logits = isinstance(outputs, Tensor) and outputs.dim() == 2 and outputs.shape[1] == classes
    return "kl" if classes > 1 and logits else "cosine"


def base_task(loss: str, data_kind: str, user: Task | None) -> Task:
    """The task that runs the model: the user's, else the built-in for ``loss``/the data.

    loss: one of LOSSES ('auto' = from the data's labels; 'distill' = only the forward
    of this task is used). data_kind: 'classification', 'regression' or 'inputs' (no
    labels). Raises SettingError/DataError (one line) for combinations that cannot train.
    """
    if loss not in LOSSES:
        raise choice_error("loss", loss, LOSSES)
    if loss == "distill":
        return user or Task()  # only its forward (dict inputs as keywords) is used
    if user is not None:
        if loss != "auto":
            raise SettingError(
                f"--loss {loss} would replace the loss of --task; drop one (or use --loss distill)"
            )
        return user
    kind = data_kind if loss == "auto" else loss
    if data_kind == "inputs":
        raise DataError(
            f"--loss {loss} needs labels but the data holds inputs only; use --loss distill "
            "(targets = the dense model's outputs) or a --task with its own loss"
        )
    return make_task(kind)
