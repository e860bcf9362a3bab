"""Diagonal Fisher and mean gradient, with per-example semantics.

Labels (where the per-example gradient's targets come from):
- ``exact``: expectation over the model's predictive distribution, one backward per class
  weighted by sqrt(p_c) (the true Fisher; classification only);
- ``sampled``: ``samples`` targets drawn from the model per example (Monte Carlo true
  Fisher), each example's from a stream keyed by (seed, step, example index)
  (``types.LabelKey``), so batch size and number of processes never change them;
- ``empirical``: the data's own targets (the empirical Fisher).

The diagonal is (1/N) sum_i sum_terms (d term_i / d theta)^2 over all N examples seen, so a
batch of N examples and N batches of one give the same result.

Padding. For a Linear applied to padded sequences (its input (N, T, ..., D) with
x.shape[:2] equal to the task's ``position_mask`` (N, T)) or an Embedding of ids (N, T),
the per-example gradient is the sum over REAL positions of g_t a_t^T: padded positions
are left out even when the model lets them reach its outputs. Targets taken by the exact
per-example path (recurrent, custom, shared modules) get their true gradient, which
excludes padding as far as the model itself does.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from prunekit.criteria.capture import Recorder, capture, scoring_mode
from prunekit.criteria.persample import (
    conv_sq_grads,
    embedding_hookable,
    embedding_sq_grads,
    linear_sq_grads,
    position_weights,
    shared_parameters,
)
from prunekit.criteria.unrolled import functional_twin
from prunekit.errors import DataError, SettingError, choice_error, int_setting
from prunekit.types import Batch, LabelKey, Target, Task, all_reduce_sums, batch_size

log = logging.getLogger(__name__)

LABELS = ("exact", "sampled", "empirical")


def check_labels(labels: str, task: Task, samples: int = 1) -> None:
    """Raise SettingError unless ``labels`` is valid for ``task`` (and samples >= 1)."""
    if labels not in LABELS:
        raise choice_error("Fisher labels", labels, LABELS)
    if labels == "exact" and not task.categorical:
        raise SettingError(
            f"Fisher labels 'exact' need a categorical output (a classifier, or distillation "
            f"with kl), not a {task.kind!r} task; use --fisher-labels sampled or empirical"
        )
    if labels == "sampled":
        int_setting(samples, "Fisher samples", 1)


def label_sets(
    task: Task, outputs: Tensor, batch: Batch, labels: str, samples: int, key: LabelKey,
    start: int,
) -> list[Tensor] | None:  # fmt: skip
    """Targets of each per-example term for one batch; None means exact (all classes).

    Sampled labels: draw s of the batch's local examples start .. start+N-1 comes from
    ``key.draws(start, N, s)`` (``Task.sample_examples``): keyed by seed, step and global
    example index, so the labels do not depend on the batching or the number of processes.
    """
    if labels == "empirical":
        try:
            return [task.targets(batch)]
        except (IndexError, KeyError, TypeError) as exc:
            raise DataError("Fisher labels 'empirical' need data with labels") from exc
    if labels == "sampled":
        n = batch_size(batch)
        return [task.sample_examples(outputs, key.draws(start, n, s)) for s in range(samples)]
    return None


def term_values(
    task: Task, outputs: Tensor, sets: list[Tensor] | None, batch: Batch = None
) -> list[Tensor]:
    """Values whose summed squared per-example gradients, over all terms, give the Fisher.

    One term per class for exact labels (``task.exact_terms``), else one per label set,
    scaled by 1/sqrt(#sets). Given the ``batch``, a set's term is the task's
    ``example_losses`` on the batch with those targets (a user task without per-example
    losses gives the batch total, which is all the gradients need); without it,
    ``task.nll(outputs, targets)``. Built-in tasks give (N,) per-example values.
    """
    if sets is None:
        return task.exact_terms(outputs)
    weight = 1.0 / math.sqrt(len(sets))
    if batch is None:
        return [task.nll(outputs, y) * weight for y in sets]
    return [task.example_losses(outputs, task.with_targets(batch, y)) * weight for y in sets]


def _hook_sq_grads(
    module: nn.Module, xs: list[Tensor], gys: list[Tensor], mask: Tensor | None
) -> Tensor | None:
    """sum_i (d term_i / dW)^2 of a hooked weight from its calls' inputs and output grads.

    mask: the batch's (N, T) position mask; padded positions of a Linear applied to
    sequences are left out (``persample.position_weights``).
    """
    weights = [position_weights(module, x, mask) for x in xs]
    if isinstance(module, nn.Linear):
        return linear_sq_grads(xs, gys, weights)
    if isinstance(module, nn.Embedding):
        return embedding_sq_grads(module, xs, gys, weights)
    return conv_sq_grads(module, xs[0], gys[0])


def _hookable(module: nn.Module, rec: Recorder, name: str, n: int) -> bool:
    """True when the hooks give module ``name``'s per-example gradients in this batch.

    Every call's input must be batch-first (a Linear fed (N*T, D) would otherwise count
    tokens as examples); a Linear or Embedding may run several times (its gradient sums
    over calls), a conv exactly once. The other cases take the exact per-example path.
    """
    calls = rec.inputs.get(name, [])
    if not calls or any(x.dim() == 0 or x.shape[0] != n for x in calls):
        return False
    return isinstance(module, (nn.Linear, nn.Embedding)) or len(calls) == 1


def slice_batch(batch: Batch, index: int) -> Batch:
    """The example ``index`` of a batch as a batch of one (tensors, tuples, dicts)."""
    if isinstance(batch, Tensor):
        return batch[index : index + 1]
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(b, index) for b in batch)
    if isinstance(batch, dict):
        return {k: slice_batch(v, index) for k, v in batch.items()}
    return batch


def _fast_modules(model: nn.Module, targets: dict[str, Target]) -> dict[str, str]:
    """Target name -> module name for weights whose squared gradients come from hooks."""
    from prunekit.criteria.persample import supports_fast_path

    modules = dict(model.named_modules())
    tied = shared_parameters(model)
    return {
        t.name: t.module
        for t in targets.values()
        if t.name == (f"{t.module}.weight" if t.module else "weight")
        and t.name not in tied
        and (supports_fast_path(modules[t.module]) or embedding_hookable(modules[t.module]))
    }


def _accumulator(p: Tensor) -> Tensor:
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


# Largest number of per-example gradient entries the vmap path builds at once (~128 MB fp32).
_VMAP_CHUNK_ENTRIES = 32 * 1024 * 1024


class _TaskForward(nn.Module):
    """``task.forward(model, batch)`` as a module call, so functional_call can wrap it."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Batch) -> Tensor:
        return self.task.forward(self.model, batch)


def _tensor_leaves(batch: Batch, fn, other=None):
    """Apply ``fn`` to every tensor of a (nested) batch, ``other`` (or identity) elsewhere."""
    return tree_map(
        lambda v: fn(v) if isinstance(v, Tensor) else (other or (lambda u: u))(v), batch
    )


def _vmap_sq_grads(model, task, batch, sets, names, params) -> dict[str, Tensor]:
    """sum_i sum_terms (d term_i / d theta)^2 for ``names``, by torch.func.

    Per chunk of examples: vmap over examples of jacrev over the stacked label terms (C
    classes for exact labels, one per drawn/data label otherwise), each example run as a
    batch of one through ``task.forward``. nn.LSTM/GRU/RNN run as their unrolled twins.
    Raises whatever vmap raises on models it cannot batch (the caller falls back).
    """
    net = _TaskForward(functional_twin(model), task)
    fixed = {f"model.{n}": p.detach() for n, p in params.items()}
    labels = None if sets is None else torch.stack(sets)  # (S, N, ...): dim 1 is the example

    def terms(weights, example, ys):
        sub = _tensor_leaves(example, lambda v: v.unsqueeze(0))
        sub_sets = None if ys is None else [y.unsqueeze(0) for y in ys.unbind(0)]
        out = functional_call(net, {**fixed, **weights}, (sub,))
        return torch.stack([v.sum() for v in term_values(task, out, sub_sets, sub)])

    weights = {f"model.{n}": params[n].detach() for n in names}
    per_call = vmap(
        jacrev(terms),
        in_dims=(
            None,
            _tensor_leaves(batch, lambda _: 0, lambda _: None),
            None if sets is None else 1,
        ),
    )
    if sets is None:  # exact labels: one term per class; read C off one example's outputs
        with torch.no_grad():
            n_terms = task.forward(model, slice_batch(batch, 0)).shape[-1]
    else:
        n_terms = len(sets)
    size = sum(params[n].numel() for n in names) * n_terms
    step = max(1, _VMAP_CHUNK_ENTRIES // max(1, size))
    out = {n: _accumulator(params[n]) for n in names}
    total = batch_size(batch)
    for start in range(0, total, step):
        part = _tensor_leaves(batch, lambda v, a=start: v[a : a + step])
        ys = None if labels is None else labels[:, start : start + step]
        jac = per_call(weights, part, ys)
        for n in names:
            out[n] += jac[f"model.{n}"].detach().to(out[n].dtype).pow(2).sum((0, 1))
    return out


def _loop_sq_grads(model, task, batch, sets, names, params, acc) -> None:
    """Targets the hooks cannot do (recurrent, custom, shared, exotic convs), exactly.

    Fast path: per-example gradients by torch.func (``_vmap_sq_grads``). Where vmap cannot
    batch the model, the slow path: one example at a time, autograd w.r.t. the parameters.
    """
    try:
        with warnings.catch_warnings():
            # a missing batching rule only means a slower vmap, not a wrong one
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            sums = _vmap_sq_grads(model, task, batch, sets, names, params)
    except Exception as exc:  # vmap raises many types (in-place ops, .item(), control flow)
        log.debug("vmap per-example gradients failed (%s); looping over examples", exc)
        sums = None
    if sums is not None:
        for n in names:
            acc[n] += sums[n]
        return
    tensors = [params[n] for n in names]
    for i in range(batch_size(batch)):
        sub = slice_batch(batch, i)
        sub_sets = None if sets is None else [y[i : i + 1] for y in sets]
        for term in term_values(task, task.forward(model, sub), sub_sets, sub):
            grads = torch.autograd.grad(term.sum(), tensors, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[n] += g.detach().to(acc[n].dtype).pow(2)


def squared_gradient_sums(
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    labels: str = "exact",
    samples: int = 1,
    generator: torch.Generator | LabelKey | None = None,
) -> tuple[dict[str, Tensor], int]:
    """(sum over examples and label terms of squared per-example gradients, examples seen).

    Result tensors have the targets' shapes, float32 (float64 for float64 models). Linear,
    Conv and Embedding weights go through hooks (one backward per label term per batch);
    any other target (and tied weights, or layers fed non-batch-first inputs) through the
    exact per-example path. The task's ``position_mask`` (read once per batch) drops padded
    positions (module docstring). Sampled labels are keyed by example
    (``LabelKey.of(generator)``, see ``label_sets``). Model state is left untouched.
    """
    check_labels(labels, task, samples)
    key = LabelKey.of(generator)
    params = dict(model.named_parameters())
    acc = {n: _accumulator(params[n]) for n in targets}
    fast = _fast_modules(model, targets)
    modules = dict(model.named_modules())
    seen = 0
    with scoring_mode(model), capture(model, set(fast.values())) as rec:
        for batch in batches:
            rec.clear()
            n_batch = batch_size(batch)
            mask = task.position_mask(batch)  # (N, T) or None, once per batch
            outputs = task.forward(model, batch)
            sets = label_sets(task, outputs, batch, labels, samples, key, seen)
            hooked = {n: m for n, m in fast.items() if _hookable(modules[m], rec, m, n_batch)}
            for term in term_values(task, outputs, sets, batch):
                grads = rec.output_grads(term.sum(), sorted(set(hooked.values())))
                for n, m in hooked.items():
                    gys = [g.detach() for g in grads[m]]
                    sq = _hook_sq_grads(modules[m], rec.inputs[m], gys, mask)
                    acc[n] += sq.to(acc[n].dtype)
            slow = [n for n in targets if n not in hooked]
            if slow:
                rec.clear()
                with rec.paused():  # per-example forwards must not pile up recordings
                    _loop_sq_grads(model, task, batch, sets, slow, params, acc)
            seen += n_batch
            del outputs
    seen = all_reduce_sums(acc.values(), seen)
    if seen == 0:
        raise DataError("no examples to estimate the Fisher from (the data is empty)")
    return acc, seen


def mean_gradient(
    model: nn.Module, task: Task, names: Iterable[str], batches: Iterable[Batch]
) -> dict[str, Tensor]:
    """Mean over examples of the training-loss gradient (data labels), per named tensor."""
    params = dict(model.named_parameters())
    names = list(names)
    acc = {n: _accumulator(params[n]) for n in names}
    seen = 0
    with scoring_mode(model):
        for batch in batches:
            n_batch = batch_size(batch)
            loss = task.loss(task.forward(model, batch), batch) * n_batch
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[n] += g.detach().to(acc[n].dtype)
            seen += n_batch
    seen = all_reduce_sums(acc.values(), seen)
    if seen == 0:
        raise DataError("no examples to estimate the gradient from (the data is empty)")
    return {n: a / seen for n, a in acc.items()}
