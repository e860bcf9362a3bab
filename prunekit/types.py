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


# Keyed random draws (design.md 5: every draw keyed by seed, step and example index) -------

_M32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # below 2**27: every product of a 32-bit value stays below 2**59 (int64)
_GOLDEN = 0x9E3779B9
_LABELS_TAG = 0x6C61626C  # 'labl': these streams are the Fisher's sampled labels


def _mix32(x):
    """A bijective 32-bit hash of ``x`` (an int, or an int64 tensor of values in [0, 2**32))."""
    x = (((x >> 16) ^ x) * _MULT) & _M32
    x = (((x >> 16) ^ x) * _MULT) & _M32
    return (x >> 16) ^ x


def _absorb(state, word):
    """The hash state after taking in one 32-bit ``word`` (ints or int64 tensors); for a
    fixed state it is a bijection of the word, so distinct keys never share a stream."""
    return _mix32(((state ^ word) + _GOLDEN) & _M32)


def _absorb_int(state: int, value: int) -> int:
    """``state`` after taking in a Python int of up to 64 bits (two's complement)."""
    value %= 2**64
    return _absorb(_absorb(state, value & _M32), value >> 32)


@dataclass(frozen=True)
class ExampleDraws:
    """Random numbers for ``n`` consecutive examples of one batch, one stream per example.

    prefix: the hash of (seed, step, draw); first: the global index of the batch's first
    example; stride: the global index step between its examples (``LabelKey.draws``).
    Every value of example i is a function of (prefix, global index of i, element) alone:
    splitting the same examples into other batches or processes gives the same numbers.
    Tensors are built on the device asked for (no host round trip).
    """

    prefix: int
    first: int
    stride: int
    n: int

    def hashes(self, device=None) -> Tensor:
        """(n,) int64: one 32-bit hash per example, from its global index."""
        index = self.first + self.stride * torch.arange(self.n, device=device, dtype=torch.int64)
        return _absorb(_absorb(self.prefix, index & _M32), index >> 32)

    def uniform(self, shape: tuple[int, ...] = (), device=None, stream: int = 0) -> Tensor:
        """(n, *shape) float64 in (0, 1): element e of example i from (i's hash, e, stream)."""
        elements = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
        h = _absorb(_absorb(self.hashes(device)[:, None], elements[None, :]), stream)
        return ((h.double() + 0.5) / 2.0**32).reshape(self.n, *shape)

    def normal(self, shape: tuple[int, ...] = (), device=None) -> Tensor:
        """(n, *shape) float64 standard normal values (Box-Muller on two keyed uniforms)."""
        radius = torch.sqrt(-2.0 * torch.log(self.uniform(shape, device, 0)))
        return radius * torch.cos(2.0 * math.pi * self.uniform(shape, device, 1))

    def categorical(self, probs: Tensor) -> Tensor:
        """One class per row of ``probs`` (n, C) (rows need not be normalised) -> (n,) int64,
        by inverse CDF on the example's uniform: class c with probability probs[i, c]."""
        cdf = probs.detach().double().cumsum(-1)
        u = self.uniform((), probs.device) * cdf[:, -1]
        return (cdf < u[:, None]).sum(-1).clamp_max(probs.shape[-1] - 1)

    def generator(self, i: int) -> torch.Generator:
        """A CPU generator seeded from example ``i``'s key alone (for a task's ``sample``)."""
        index = self.first + self.stride * int(i)
        h = _absorb(_absorb(self.prefix, index & _M32), index >> 32)
        seed = (_absorb(h, 1) << 32) | _absorb(h, 2)
        return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class LabelKey:
    """Where sampled Fisher labels come from: draws keyed by (seed, step, example index).

    A curvature pass numbers the examples it sees 0, 1, 2, ... in order; local example j
    is global example ``offset + stride * j`` (a torchrun rank that holds examples
    rank::world has offset=rank, stride=world). Labels therefore depend on neither the
    batch size nor the number of processes, and a second pass draws the same labels again.
    """

    seed: int = 0
    step: int = 0
    offset: int = 0
    stride: int = 1

    def draws(self, start: int, n: int, draw: int = 0) -> ExampleDraws:
        """The streams of local examples start .. start+n-1 for label draw ``draw``."""
        prefix = _absorb_int(_absorb_int(_absorb(_LABELS_TAG, 0), self.seed), self.step)
        prefix = _absorb_int(prefix, draw)
        return ExampleDraws(prefix, self.offset + self.stride * int(start), self.stride, int(n))

    @classmethod
    def of(cls, source: LabelKey | torch.Generator | None) -> LabelKey:
        """A key from a key (itself), None (seed 0) or a torch.Generator (its seed is one
        draw of it, so the generator advances as sampling used to advance it)."""
        if isinstance(source, LabelKey):
            return source
        if source is None:
            return cls()
        seed = torch.randint(0, 2**62, (1,), generator=source, device=source.device)
        return cls(seed=int(seed))


class Task:
    """The only model-specific glue: how to run the model on a batch and score its outputs.

    Public protocol (what a user task implements): ``forward(model, batch) -> outputs``,
    ``loss(outputs, batch) -> scalar mean``, optionally ``sample(outputs, generator) ->
    targets`` (for the sampled true Fisher) and ``metrics(outputs, batch)``. Batches are a
    tensor, a dict of tensors, or ``(inputs, targets)`` with inputs a tensor or a dict.
    The Fisher draws labels through ``sample_examples(outputs, draws)``, keyed per example
    (``LabelKey``); its default calls ``sample`` once per example with that example's own
    generator, so a user's ``sample`` gets batch-independent labels too.

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

    def sample_examples(self, outputs: Any, draws: ExampleDraws) -> Any:
        """Targets drawn from the predictive distribution, example i's from ``draws`` of
        example i alone, so a label never depends on the batch it is in (design.md 5).

        Default: ``sample`` on each example's outputs (a batch of one) with its own
        ``draws.generator(i)``, concatenated along dim 0 (a loop; the built-in tasks
        override it with one vectorised draw).
        """
        rows = [
            self.sample(take_rows(outputs, slice(i, i + 1)), draws.generator(i))
            for i in range(draws.n)
        ]
        return _cat_rows(rows)

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, float]:
        """Sums over the batch: ``loss`` and, for classifiers, ``correct``."""
        return {"loss": float(self.example_losses(outputs, batch).detach().sum())}


def _cat_rows(rows: list) -> Any:
    """One batch from per-example results: tensors (or dicts/tuples of them) along dim 0."""
    first = rows[0]
    if isinstance(first, dict):
        return {k: _cat_rows([r[k] for r in rows]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_rows(list(part)) for part in zip(*rows, strict=True))
    return torch.cat([torch.as_tensor(r) for r in rows])


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

    def sample_examples(self, outputs: Tensor, draws: ExampleDraws) -> Tensor:
        """Labels drawn from softmax(outputs), shape (N,), keyed per example."""
        return draws.categorical(torch.softmax(outputs.detach().double(), dim=-1))

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

    def sample_examples(self, outputs: Tensor, draws: ExampleDraws) -> Tensor:
        """Targets drawn from N(outputs, I), keyed per example."""
        noise = draws.normal(tuple(outputs.shape[1:]), outputs.device)
        return outputs.detach() + noise.to(outputs.dtype)


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
