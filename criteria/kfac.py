"""KFAC curvature (Kronecker factors) for Linear, Conv1d and Conv2d targets.

Conventions used by kfac.py, ekfac.py and obs.py
------------------------------------------------
Block. Each factored target is one block per group (1 unless a grouped conv): the weight
of the group as a matrix ``W_g`` of shape (o, i) (o = out channels of the group, i = in
channels of the group x kernel size, in ``weight.reshape(out, -1)`` order) with the bias,
when the module has one, appended as the LAST column: ``[W_g | b_g]``, shape (o, i'),
i' = i + 1 with a bias, i otherwise.

vec. Row-major: entry (r, c) of the block is parameter r * i' + c. With this convention a
per-example gradient ``g a^T`` has vec ``kron(g, a)`` and the KFAC block is
``kron(G, A)`` (torch.kron order; the same matrix is "A (x) G" under column-major vec).

Rows. For one example n, ``a_nt`` (length i', last entry 1 with a bias) and ``g_nt`` (length
o) are the layer's input patch and the gradient of one label term w.r.t. the layer's output
at position t (conv output locations, extra leading dims of a Linear input, and repeated
calls of the module all count as positions). The per-example gradient is
``sum_t g_nt a_nt^T``.

Factors. N = examples seen, terms as in ``criteria.fisher`` (exact / sampled / empirical):

    A = (1/N) sum_n sum_t a_nt a_nt^T                      (i' x i')
    G = (1/N) sum_n sum_terms (1/T_n) sum_t g_nt g_nt^T    (o x o)

Every term is a per-example sum, so a batch of N examples and N batches of one give the
same factors. For a Linear layer on one example, ``kron(G, A)`` is the exact Fisher block;
for convs the 1/T in G is the KFC convention (Grosse & Martens 2016, nngeometry).

Sequences and padding. A Linear applied to x (N, T, ..., D) is treated like a conv: its
positions are summed in A (divided by N, not by positions) and averaged in G. When the task's
``position_mask(batch)`` (N, T) matches x.shape[:2], padded positions are dropped: their
activation rows (ones column included) and gradient rows are zeroed, and T_n above is the
number of REAL positions of example n (over all calls), not the padded length. So an
example's factors do not depend on how much padding its batch added, and a batch of N
padded examples gives the factors of N unpadded batches of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from prunekit.criteria.capture import capture, scoring_mode
from prunekit.criteria.diag import Diag, damping_value, fit_diag
from prunekit.criteria.eigh import factor_eighs
from prunekit.criteria.fisher import check_labels, label_sets, term_values
from prunekit.criteria.persample import (
    conv_patches,
    position_weights,
    shared_parameters,
    supports_fast_path,
)
from prunekit.errors import DataError, ModelError
from prunekit.types import Batch, LabelKey, Target, Task, all_reduce_sums, batch_size

_FACTOR_KINDS = ("linear", "conv")


@dataclass(frozen=True)
class Layer:
    """Geometry of one factored target.

    target: the weight's parameter name; module: owning module name; bias: the bias
    parameter name or None; shape: weight shape; groups: conv groups (1 for Linear).
    """

    target: str
    module: str
    bias: str | None
    shape: tuple[int, ...]
    groups: int

    @property
    def rows(self) -> int:
        """o: output rows per group."""
        return self.shape[0] // self.groups

    @property
    def cols(self) -> int:
        """i': input columns per group, bias column included."""
        return math.prod(self.shape[1:]) + (self.bias is not None)


def split_targets(
    model: nn.Module, targets: dict[str, Target]
) -> tuple[dict[str, Layer], dict[str, Target]]:
    """(targets KFAC/EKFAC can factor, keyed by target name; the others, for ``diag``).

    Factorable: the ``weight`` of a Linear, or of a Conv1d/Conv2d with zero (or 'valid')
    padding; grouped convs are factored per group. Everything else (recurrent, embedding,
    custom, Conv3d, 'same' padding, reflect padding, weights tied to another module) falls
    back to the diagonal estimator.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    tied = shared_parameters(model)  # hooks would see one use of a tied weight only
    layers: dict[str, Layer] = {}
    rest: dict[str, Target] = {}
    for name, t in targets.items():
        module = modules.get(t.module)
        own = f"{t.module}.weight" if t.module else "weight"
        if (
            t.kind in _FACTOR_KINDS
            and name == own
            and name not in tied
            and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and supports_fast_path(module)
        ):
            bias = f"{t.module}.bias" if t.module else "bias"
            groups = getattr(module, "groups", 1)
            has_bias = getattr(module, "bias", None) is not None
            layers[name] = Layer(name, t.module, bias if has_bias else None, t.shape, groups)
        else:
            rest[name] = t
    missing = [n for n in layers if n not in params]
    if missing:
        raise ModelError(f"targets {missing} are not parameters of the model")
    return layers, rest


def activation_rows(
    module: nn.Module, layer: Layer, x: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Input rows a of one call: (N, groups, positions, i'), ones column last with a bias.

    weights: (N, positions) 0/1 position weights of a Linear (``position_weights``): rows
    of padded positions, ones column included, become 0.
    """
    n = x.shape[0]
    if isinstance(module, nn.Linear):
        rows = x.reshape(n, 1, -1, x.shape[-1])
    else:
        cols = conv_patches(module, x)  # (N, C_in * k, L), channel-major like the weight
        rows = cols.reshape(n, layer.groups, -1, cols.shape[-1]).transpose(2, 3)
    if layer.bias is not None:
        ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)
        rows = torch.cat([rows, ones], dim=-1)
    return rows if weights is None else rows * weights[:, None, :, None].to(rows.dtype)


def gradient_rows(
    module: nn.Module, layer: Layer, gy: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Output-gradient rows g of one call: (N, groups, positions, o); weights as above."""
    n = gy.shape[0]
    if isinstance(module, nn.Linear):
        rows = gy.reshape(n, 1, -1, gy.shape[-1])
    else:
        rows = gy.reshape(n, layer.groups, layer.rows, -1).transpose(2, 3)
    return rows if weights is None else rows * weights[:, None, :, None].to(rows.dtype)


def accumulator_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (design.md: float32 accumulation)."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def reiterable(batches: Iterable[Batch]) -> Sequence[Batch]:
    """``batches`` itself if it can be iterated twice (a sequence), else a list of it."""
    return batches if isinstance(batches, Sequence) else list(batches)


def _cat_calls(parts: list[Tensor]) -> Tensor:
    """Concatenate the rows of repeated calls of one module along the position axis."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class BatchRows(NamedTuple):
    """One batch of ``stream_rows``, rows detached and in the accumulation dtype.

    examples: N. acts: per target, activation rows (N, groups, L, i') of all calls
    (``activation_rows``). positions: per target, (N,) float64 count of each example's
    real positions over all calls (padding excluded; at least 1, so it can divide). terms:
    iterator over label terms of gradient rows per target (N, groups, L, o); consume it
    before advancing the stream.
    """

    examples: int
    acts: dict[str, Tensor]
    positions: dict[str, Tensor]
    terms: Iterator[dict[str, Tensor]]


def _check_batch_first(rec, reached: list[str], n: int) -> None:
    for m in reached:
        if any(x.shape[0] != n for x in rec.inputs[m]):
            raise ModelError(
                f"module {m!r} saw inputs whose first dimension is not the batch "
                f"({n}); exclude it from the targets or use --fisher diag"
            )


def _layer_acts(module, layer, xs, weights, dtype) -> tuple[Tensor, Tensor]:
    """(activation rows of all calls (N, g, L, i'), real positions per example (N,))."""
    parts = [
        activation_rows(module, layer, x, w).to(dtype) for x, w in zip(xs, weights, strict=True)
    ]
    n, device = parts[0].shape[0], parts[0].device
    count = torch.zeros(n, dtype=torch.float64, device=device)
    for rows, w in zip(parts, weights, strict=True):
        count += rows.shape[2] if w is None else w.sum(1).to(device=device, dtype=torch.float64)
    return _cat_calls(parts), count.clamp_min(1.0)


def stream_rows(
    model: nn.Module,
    task: Task,
    layers: dict[str, Layer],
    batches: Iterable[Batch],
    *,
    labels: str,
    samples: int,
    generator: torch.Generator | LabelKey,
) -> Iterator[BatchRows]:
    """Per batch: its examples, activation rows, real positions and gradient rows per term.

    The task's ``position_mask(batch)`` (read once per batch) zeroes the rows of padded
    positions of Linear layers applied to (N, T, ...) sequences (``position_weights``).
    Sampled labels are keyed by example (``fisher.label_sets``): every pass with the same
    key draws the same labels. Runs in ``scoring_mode``: no trace left. A layer the batch
    did not reach is absent.
    """
    modules = dict(model.named_modules())
    dtype = accumulator_dtype(model)
    by_module = {ly.module: ly for ly in layers.values()}
    key, start = LabelKey.of(generator), 0
    with scoring_mode(model), capture(model, list(by_module)) as rec:
        for batch in batches:
            rec.clear()
            n = batch_size(batch)
            mask = task.position_mask(batch)
            outputs = task.forward(model, batch)
            reached = [m for m in by_module if rec.outputs[m]]
            _check_batch_first(rec, reached, n)
            weights = {
                m: [position_weights(modules[m], x, mask) for x in rec.inputs[m]] for m in reached
            }
            acts, positions = {}, {}
            for m in reached:
                t = by_module[m].target
                acts[t], positions[t] = _layer_acts(
                    modules[m], by_module[m], rec.inputs[m], weights[m], dtype
                )
            sets = label_sets(task, outputs, batch, labels, samples, key, start)
            start += n
            terms = _term_rows(rec, modules, by_module, weights, task, outputs, sets, dtype, batch)
            yield BatchRows(n, acts, positions, terms)
            del outputs


def _term_rows(rec, modules, by_module, weights, task, outputs, sets, dtype, batch):
    """Gradient rows of each label term (a generator, so only one term is held at once)."""
    reached = list(weights)
    for term in term_values(task, outputs, sets, batch):
        grads = rec.output_grads(term.sum(), reached)
        yield {
            by_module[m].target: _cat_calls(
                [
                    gradient_rows(modules[m], by_module[m], g.detach(), w).to(dtype)
                    for g, w in zip(grads[m], weights[m], strict=True)
                ]
            )
            for m in reached
        }


def _add_group_gram(acc: Tensor, rows: Tensor, scale: Tensor | None = None) -> None:
    """acc (g, d, d) += sum over examples and positions of r r^T per group, rows (N, g, L, d).

    scale: per-example factors broadcast against rows, or None. Accumulates in place
    (baddbmm): no product-sized temporary, no separate add.
    """
    scaled = rows if scale is None else rows * scale
    flat = scaled.transpose(0, 1).reshape(rows.shape[1], -1, rows.shape[-1])
    acc.baddbmm_(flat.transpose(1, 2), flat)


def _check_reached(layers: dict[str, Layer], calls: Tensor) -> None:
    """ModelError naming the factored layers whose module never ran (zero factors otherwise).

    E.g. nn.MultiheadAttention's ``out_proj``: its parent reads the weight directly, so no
    hook ever fires and KFAC would silently give those weights zero curvature.
    """
    never = [ly.module for ly, c in zip(layers.values(), calls.tolist(), strict=True) if c == 0]
    if never:
        raise ModelError(
            f"modules {never} never ran in the model's forward (their weights are used by "
            "a parent module directly), so KFAC/EKFAC cannot see them; exclude them from "
            "the targets or use --fisher diag"
        )


def fit_factors(
    model: nn.Module,
    task: Task,
    layers: dict[str, Layer],
    batches: Iterable[Batch],
    *,
    labels: str,
    samples: int,
    generator: torch.Generator | LabelKey,
    keep: Callable[[dict[str, Tensor], list[dict[str, Tensor]]], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """(A per target (groups, i', i'), G per target (groups, o, o), examples seen).

    Means over examples as in the module docstring; batches are streamed once. keep: if
    given, called once per batch with (activation rows per target, [gradient rows per
    target for each label term]) -- the rows of ``stream_rows`` -- so that a caller (EKFAC)
    can reuse them instead of running a second pass.
    """
    dtype = accumulator_dtype(model)
    device = next(model.parameters()).device
    a_acc = {
        t: torch.zeros(ly.groups, ly.cols, ly.cols, dtype=dtype, device=device)
        for t, ly in layers.items()
    }
    g_acc = {
        t: torch.zeros(ly.groups, ly.rows, ly.rows, dtype=dtype, device=device)
        for t, ly in layers.items()
    }
    seen, calls = 0, torch.zeros(len(layers), dtype=torch.float64, device=device)
    index = {t: i for i, t in enumerate(layers)}
    stream = stream_rows(
        model, task, layers, batches, labels=labels, samples=samples, generator=generator
    )
    for n, acts, positions, terms in stream:
        for t, a in acts.items():
            _add_group_gram(a_acc[t], a)
            calls[index[t]] += 1
        # 1/T_n of KFC, T_n = example n's real positions (float64, then the rows' dtype)
        scale = {t: p.rsqrt().to(dtype)[:, None, None, None] for t, p in positions.items()}
        kept = []
        for grads in terms:
            for t, g in grads.items():
                _add_group_gram(g_acc[t], g, scale[t])
            if keep is not None:
                kept.append(grads)
        if keep is not None:
            keep(acts, kept)
        seen += n
    seen = all_reduce_sums([*a_acc.values(), *g_acc.values(), calls], seen)
    if seen == 0:
        raise DataError("no examples to estimate the Fisher from (the data is empty)")
    _check_reached(layers, calls)
    return {t: a / seen for t, a in a_acc.items()}, {t: g / seen for t, g in g_acc.items()}, seen


def kfe_diagonal(u_g: Tensor, scale: Tensor, u_a: Tensor) -> Tensor:
    """diag(Q diag(vec scale) Q^T) as a block, Q = kron(U_G, U_A): (U_G∘U_G) S (U_A∘U_A)^T.

    u_g (g, o, o), scale (g, o, i'), u_a (g, i', i') -> (g, o, i'). Never builds Q.
    """
    return u_g.pow(2) @ scale @ u_a.pow(2).transpose(-1, -2)


def block_to_params(layer: Layer, block: Tensor) -> dict[str, Tensor]:
    """Split a (groups, o, i') block into {weight: weight-shaped, bias: (out,)}."""
    out = {}
    weight_cols = block[..., : block.shape[-1] - (layer.bias is not None)]
    out[layer.target] = weight_cols.reshape(layer.shape)
    if layer.bias is not None:
        out[layer.bias] = block[..., -1].reshape(layer.shape[0])
    return out


def params_to_block(layer: Layer, weight: Tensor, bias: Tensor | None, fill: float = 0.0):
    """Inverse of ``block_to_params``: weight (+ bias, or ``fill`` when None) -> (g, o, i')."""
    block = weight.reshape(layer.groups, layer.rows, -1)
    if layer.bias is not None:
        b = bias if bias is not None else torch.full((layer.shape[0],), fill, dtype=block.dtype)
        block = torch.cat([block, b.to(block).reshape(layer.groups, layer.rows, 1)], dim=-1)
    return block


@dataclass(frozen=True)
class KFAC:
    """KFAC curvature: per factored target, A (groups, i', i') and G (groups, o, o).

    fallback: the ``Diag`` of the targets KFAC cannot factor (or None); labels, examples:
    as for ``Diag``. The Fisher block of a target is approximated by ``kron(G, A)``.
    """

    layers: dict[str, Layer]
    A: dict[str, Tensor]
    G: dict[str, Tensor]
    fallback: Diag | None
    labels: str
    examples: int

    def block_diagonal(self) -> dict[str, Tensor]:
        """diag(kron(G, A)) per factored target as a (groups, o, i') block: diag G diag A^T."""
        return {
            t: self.G[t].diagonal(dim1=-2, dim2=-1)[..., :, None]
            * self.A[t].diagonal(dim1=-2, dim2=-1)[..., None, :]
            for t in self.layers
        }

    def _per_target(self, blocks: dict[str, Tensor], bias: bool) -> dict[str, Tensor]:
        out = {}
        for t, block in blocks.items():
            parts = block_to_params(self.layers[t], block)
            out.update(parts if bias else {t: parts[t]})
        return out

    def diagonal(self) -> dict[str, Tensor]:
        """The Fisher diagonal per target (weights only), shaped like each target."""
        out = self._per_target(self.block_diagonal(), bias=False)
        return {**out, **(self.fallback.diagonal() if self.fallback else {})}

    def bias_diagonal(self) -> dict[str, Tensor]:
        """The Fisher diagonal of the bias column of each factored layer (bias name -> (out,))."""
        full = self._per_target(self.block_diagonal(), bias=True)
        return {n: v for n, v in full.items() if n not in self.layers}

    def kfe(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """(U_G, lambda_G ⊗ lambda_A, U_A) per target: KFAC in its eigenbasis.

        The eigendecompositions run here, spread over the ranks of a torch.distributed job
        (``criteria.eigh.eigh_factors``): every rank must call this together.
        """
        lam_a, u_a, lam_g, u_g = factor_eighs(self.layers, self.A, self.G)
        return {
            t: (u_g[t], lam_g[t][..., :, None] * lam_a[t][..., None, :], u_a[t])
            for t in self.layers
        }

    def inverse_diagonal(self, damping: float = 1e-3, absolute: float = 0.0) -> dict[str, Tensor]:
        """diag((F + lam I)^-1) per target, lam = damping * mean(eigenvalues) + absolute."""
        return inverse_diagonal_of(self, damping, absolute)

    def estimators(self) -> dict[str, str]:
        """'kfac' for factored targets, 'diag' for the fallback ones."""
        out = {t: "kfac" for t in self.layers}
        return {**out, **(self.fallback.estimators() if self.fallback else {})}


def inverse_diagonal_of(curv, damping: float, absolute: float) -> dict[str, Tensor]:
    """diag((F + lam I)^-1) = (U_G∘U_G) (1/(S+lam)) (U_A∘U_A)^T for any value with ``kfe()``.

    lam is per target: ``damping * mean(S) + absolute`` (S: the eigenvalues in the KFE).
    Weights only; fallback targets use ``Diag.inverse_diagonal`` with the same damping.
    """
    out = {}
    for t, (u_g, scale, u_a) in curv.kfe().items():
        lam = damping_value(scale, damping, absolute)
        block = kfe_diagonal(u_g, 1.0 / (scale + lam), u_a)
        out[t] = block_to_params(curv.layers[t], block)[t]
    if curv.fallback is not None:
        out.update(curv.fallback.inverse_diagonal(damping, absolute))
    return out


def fit_kfac(
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    *,
    labels: str = "sampled",
    samples: int = 1,
    generator: torch.Generator | LabelKey | None = None,
) -> KFAC:
    """Fit KFAC factors for every factorable target; ``diag`` for the others.

    Labels: 'sampled' (default; ``samples`` draws per example), 'exact', 'empirical' (see
    ``criteria.fisher``). Batches are streamed (twice when some targets fall back to diag,
    so a one-shot iterable is then materialised). Extra memory: the factors plus one batch
    of activation rows. Model state is left untouched.
    """
    check_labels(labels, task, samples)
    gen = LabelKey.of(generator)  # one key: the diag fallback draws the factors' labels
    layers, rest = split_targets(model, targets)
    if rest and layers:
        batches = reiterable(batches)
    a, g, seen = {}, {}, 0
    if layers:
        a, g, seen = fit_factors(
            model, task, layers, batches, labels=labels, samples=samples, generator=gen
        )
    fallback = None
    if rest:
        fallback = fit_diag(
            model, task, rest, batches, labels=labels, samples=samples, generator=gen
        )
        seen = fallback.examples
    return KFAC(layers, a, g, fallback, labels, seen)
