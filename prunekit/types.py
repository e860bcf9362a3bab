"""Shared vocabulary of every room (design.md section 3).

Everything per parameter is a ``dict[str, Tensor]`` keyed by the names that
``model.named_parameters()`` yields. Scores are float32 with higher = keep; masks are bool
with True = keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Scores = dict[str, Tensor]
Masks = dict[str, Tensor]
Params = dict[str, Tensor]
Batch = Any

TARGET_KINDS = ("linear", "conv", "recurrent", "embedding", "other")
TASK_KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Target:
    """One prunable tensor.

    name: parameter name as in ``model.named_parameters()``; module: the owning module's
    name; shape: the tensor's shape; kind: one of TARGET_KINDS.
    """

    name: str
    module: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        """Number of weights in the tensor."""
        return math.prod(self.shape)


def batch_inputs(batch: Batch) -> Any:
    """The model inputs of an ``(inputs, targets)`` batch, or the batch itself otherwise.

    Inputs are a tensor or a dict of tensors (keyword arguments of the model).
    """
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def num_rows(inputs: Any) -> int:
    """Size of the leading (example) dimension of a tensor or of a dict of tensors."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch (size of the leading dimension of its inputs)."""
    return num_rows(batch_inputs(batch))


def take_rows(value: Any, index: Any) -> Any:
    """``value[index]`` along dim 0 for a tensor, or for every tensor of a (nested) batch.

    index: a slice, an index tensor or a strided slice (``rank::world``); non-tensor
    leaves are returned unchanged.
    """
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, index) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, index) for k, v in value.items()}
    return value


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of tensors, ``model(inputs)`` otherwise."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


class Task:
    """The only model-specific glue: how to run the model on a batch and score its outputs.

    Public protocol (what a user task implements): ``forward(model, batch) -> outputs``,
    ``loss(outputs, batch) -> scalar mean``, optionally ``sample(outputs, generator) ->
    targets`` (for the sampled true Fisher) and ``metrics(outputs, batch)``. Batches are a
    tensor, a dict of tensors, or ``(inputs, targets)`` with inputs a tensor or a dict.

    The Fisher estimators use ``example_losses`` (per-example losses whose sum is the
    batch's total), ``targets``/``with_targets`` (where the labels live in a batch) and, for
    categorical predictive distributions, ``exact_terms``. The defaults here handle
    ``(inputs, targets)`` tuples and dicts with a ``labels`` entry.
    """

    kind = "custom"
    label_key = "labels"

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """Outputs of ``model`` on the batch's inputs (dict inputs as keyword arguments)."""
        return call_model(model, batch_inputs(batch))

    def targets(self, batch: Batch) -> Any:
        """The data's targets of a batch: ``batch[1]``, or ``batch[label_key]`` for dicts."""
        if isinstance(batch, dict):
            return batch[self.label_key]
        if isinstance(batch, (tuple, list)):
            return batch[1]
        raise KeyError("the batch holds inputs only (no targets)")

    def with_targets(self, batch: Batch, targets: Any) -> Batch:
        """The same batch with other targets (sampled labels, for instance)."""
        if isinstance(batch, dict):
            return {**batch, self.label_key: targets}
        return (batch_inputs(batch), targets)

    def position_mask(self, batch: Batch) -> Tensor | None:
        """(N, T) bool, True = a real token, for models fed padded sequences; else None.

        Curvature statistics of Linear layers applied to (N, T, D) sequences skip the
        positions where this is False (padding). The default reads an ``attention_mask``
        entry of dict inputs.
        """
        inputs = batch_inputs(batch)
        if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), Tensor):
            return inputs["attention_mask"].bool()
        return None

    def nll(self, outputs: Tensor, targets: Any) -> Tensor:
        """Per-example negative log-likelihood, shape (N,) (built-in tasks)."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        """Scalar mean training loss of the batch."""
        return self.nll(outputs, self.targets(batch)).mean()

    def example_losses(self, outputs: Any, batch: Batch) -> Tensor:
        """Per-example losses (N,) whose sum is the batch's total loss.

        Default: ``nll`` when the task defines it, else ``loss * N`` as one value (correct
        for the Fisher whenever the loss is a mean of per-example terms, since only the
        sum's gradient is taken; per-example structure comes from the batch itself).
        """
        if type(self).nll is not Task.nll:
            return self.nll(outputs, self.targets(batch))
        return (self.loss(outputs, batch) * batch_size(batch)).reshape(1)

    @property
    def categorical(self) -> bool:
        """True when ``exact_terms`` is available (a categorical predictive distribution)."""
        return False

    def exact_terms(self, outputs: Tensor) -> list[Tensor]:
        """Per-class terms -sqrt(p_c) log p_c, each (N,): their squared gradients summed
        over classes give the exact (true) Fisher of a categorical predictive distribution."""
        raise NotImplementedError

    @property
    def can_sample(self) -> bool:
        """True when ``sample`` is implemented (the sampled true Fisher is available)."""
        return type(self).sample is not Task.sample

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Any:
        """Targets drawn from the model's predictive distribution, one per example."""
        raise NotImplementedError

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, float]:
        """Sums over the batch: ``loss`` and, for classifiers, ``correct``."""
        return {"loss": float(self.example_losses(outputs, batch).detach().sum())}


def sample_classes(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One class per row of softmax(logits) (N, C) -> (N,) int64, on the logits' device.

    On the CPU the draw comes from ``generator`` itself; elsewhere from a device generator
    seeded by one draw of it, so the probabilities never travel to the host (no sync).
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if probs.device.type == "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_gen = torch.Generator(device=probs.device).manual_seed(seed)
    return torch.multinomial(probs, 1, generator=device_gen).squeeze(1)


def categorical_terms(logits: Tensor) -> list[Tensor]:
    """-sqrt(p_c) log p_c per class c of softmax(logits) (N, C); each term (N,)."""
    logp = torch.log_softmax(logits, dim=-1)
    root_p = logp.detach().exp().sqrt()
    return [-(logp[:, c] * root_p[:, c]) for c in range(logp.shape[-1])]


class ClassificationTask(Task):
    """Softmax classifier: outputs are logits (N, C), targets class indices (N,)."""

    kind = "classification"

    @property
    def categorical(self) -> bool:
        """Exact Fisher available: the predictive distribution is softmax(outputs)."""
        return True

    def exact_terms(self, outputs: Tensor) -> list[Tensor]:
        """-sqrt(p_c) log p_c per class, p = softmax(outputs)."""
        return categorical_terms(outputs)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy per example, shape (N,)."""
        return nn.functional.cross_entropy(outputs, targets.long(), reduction="none")

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        """Labels drawn from softmax(outputs), shape (N,)."""
        return sample_classes(outputs, generator)

    def metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        """Loss sum and number of correct top-1 predictions."""
        targets = self.targets(batch)
        out = super().metrics(outputs, batch)
        out["correct"] = float((outputs.argmax(-1) == targets).sum())
        return out


class RegressionTask(Task):
    """Gaussian regression with unit variance: nll = 0.5 * squared error summed over outputs."""

    kind = "regression"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """0.5 * ||outputs - targets||^2 per example, shape (N,)."""
        diff = (outputs - targets.to(outputs.dtype)).flatten(1)
        return 0.5 * diff.pow(2).sum(1)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Mean squared error over examples and output dimensions."""
        return nn.functional.mse_loss(outputs, self.targets(batch).to(outputs.dtype))

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        """Targets drawn from N(outputs, I)."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise.to(outputs.device)


def make_task(kind: str) -> Task:
    """The built-in task for ``kind`` ('classification' or 'regression')."""
    if kind == "classification":
        return ClassificationTask()
    if kind == "regression":
        return RegressionTask()
    from prunekit.errors import choice_error

    raise choice_error("task kind", kind, TASK_KINDS)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sums(tensors, count: int) -> int:
    """Sum ``tensors`` (in place) and ``count`` over the processes of a torch.distributed job.

    Curvature and gradient accumulators call this before dividing by the examples seen, so
    every rank ends with the statistics of all ranks' shards. A no-op (returns ``count``)
    outside a multi-process job.
    """
    if _world() == 1:
        return count
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
    total = torch.tensor([float(count)], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item())
