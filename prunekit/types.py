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
    """The model inputs of an ``(inputs, targets)`` batch, or the batch itself otherwise."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch (size of the leading dimension of its inputs)."""
    inputs = batch_inputs(batch)
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch


class Task:
    """The only model-specific glue: how to run the model on a batch and score its outputs.

    Batches are ``(inputs, targets)``. ``loss`` is the scalar mean training loss; ``nll``
    is the per-example negative log-likelihood whose gradient is the per-example score
    used by every Fisher estimator; ``sample`` draws targets from the model's predictive
    distribution (for the true Fisher).
    """

    kind = "classification"

    def forward(self, model: nn.Module, batch: Batch) -> Tensor:
        """Outputs of ``model`` on the batch's inputs."""
        return model(batch_inputs(batch))

    def targets(self, batch: Batch) -> Tensor:
        """The data's targets of a batch."""
        return batch[1]

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

    def with_targets(self, batch: Batch, targets: Tensor) -> Batch:
        """The same batch with other targets (sampled labels, for instance)."""
        return (batch_inputs(batch), targets)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example negative log-likelihood, shape (N,)."""
        raise NotImplementedError

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Scalar mean training loss of the batch."""
        return self.nll(outputs, self.targets(batch)).mean()

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        """Targets drawn from the model's predictive distribution, one per example."""
        raise NotImplementedError

    def metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        """Sums over the batch: ``loss`` (of ``nll``) and, for classifiers, ``correct``."""
        return {"loss": float(self.nll(outputs, self.targets(batch)).sum())}


class ClassificationTask(Task):
    """Softmax classifier: outputs are logits (N, C), targets class indices (N,)."""

    kind = "classification"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy per example, shape (N,)."""
        return nn.functional.cross_entropy(outputs, targets.long(), reduction="none")

    def sample(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        """Labels drawn from softmax(outputs), shape (N,)."""
        probs = torch.softmax(outputs.detach().float(), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(outputs.device)

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
