"""EKFAC curvature (George et al. 2018): KFAC's eigenbasis with a re-fitted diagonal scaling.

Block, vec and row conventions are those of ``criteria.kfac``. Per factored target (and
group), with A = U_A diag(lambda_A) U_A^T and G = U_G diag(lambda_G) U_G^T, the Kronecker
eigenbasis is Q = kron(U_G, U_A) and EKFAC approximates the Fisher block by
``Q diag(vec S) Q^T`` with

    S[k, l] = (1/N) sum_n sum_terms ( (U_G^T (sum_t g_nt a_nt^T) U_A)[k, l] )^2

i.e. the per-example gradient is projected onto the basis (after summing over positions,
and after zeroing the entries of pruned weights when masks are given) and then squared.
S equals diag(Q^T F Q) for the Fisher F of the same examples and label terms, which is
the Frobenius-optimal diagonal in that basis, so EKFAC is never farther from F than KFAC.

Types: ``EKFACBasis`` holds only the eigenbasis and has no ``diagonal()``; the only ways to
get an ``EKFAC`` (which has one) are ``fit_ekfac`` and ``refit_scaling``, both of which fit
S from data. Between pruning steps keep ``ekfac.basis`` and call ``refit_scaling``.

Cost. ``fit_ekfac`` runs ONE forward/backward pass: the activation and gradient rows of
the factor pass are kept (within ``cache_bytes``) and S is fitted from them after the
eigendecomposition. Layers whose rows do not fit get a second pass that draws the same
labels (sampled labels are keyed by example, ``types.LabelKey``), so both routes give
the same S.
Without a mask and with one position (Linear on 2-D inputs) S is one matmul per batch,
``(g U_G)^2^T (a U_A)^2``; with positions (convs) or a mask, per-example gradients are
built in bounded chunks and projected with one GEMM per group and side. The
eigendecompositions are spread over the ranks of a torch.distributed job
(``criteria.eigh``).

Sequences. The rows come from ``kfac.stream_rows``, which zeroes the rows of padded
positions (``Task.position_mask``) of Linear layers applied to (N, T, ...) inputs, so
both the basis and S (cached rows or the second pass alike) ignore padding; S sums an
example's real positions before squaring and divides by N only (no 1/T_n, unlike G).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.criteria.diag import Diag, fit_diag
from prunekit.criteria.eigh import factor_eighs
from prunekit.criteria.fisher import check_labels
from prunekit.criteria.kfac import (
    KFAC,
    Layer,
    accumulator_dtype,
    block_to_params,
    fit_factors,
    inverse_diagonal_of,
    kfe_diagonal,
    params_to_block,
    reiterable,
    split_targets,
    stream_rows,
)
from prunekit.errors import DataError, ModelError
from prunekit.types import Batch, LabelKey, Masks, Target, Task, all_reduce_sums

# Largest number of per-example gradient entries built at once (~32 MB float32; the masked
# projection holds about three such buffers).
_CHUNK_ENTRIES = 8 * 1024 * 1024
# Smallest row width at which ``_project`` skips all-zero rows (see there).
_SKIP_MIN_DIM = 1024
# Default byte budget for the rows ``fit_ekfac`` keeps from its factor pass (see RowCache).
CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class EKFACBasis:
    """The Kronecker eigenbasis only: U_A (g, i', i'), U_G (g, o, o) and their eigenvalues.

    Deliberately has no ``diagonal()``: pass it to ``refit_scaling`` to get an ``EKFAC``.
    """

    layers: dict[str, Layer]
    u_a: dict[str, Tensor]
    u_g: dict[str, Tensor]
    lambda_a: dict[str, Tensor]
    lambda_g: dict[str, Tensor]

    def kfac_scaling(self) -> dict[str, Tensor]:
        """lambda_G ⊗ lambda_A per target (g, o, i'): the scaling under which EKFAC == KFAC."""
        return {
            t: self.lambda_g[t][..., :, None] * self.lambda_a[t][..., None, :] for t in self.layers
        }


def eigenbasis(kfac: KFAC) -> EKFACBasis:
    """Eigendecompose KFAC's factors (in the factors' dtype: float32, float64 in oracles).

    In a torch.distributed job the decompositions are spread over the ranks and broadcast
    (``criteria.eigh.eigh_factors``; every rank must call this together): the same basis,
    bit for bit, on every rank and as in one process, for 1/world of the work.
    """
    lam_a, u_a, lam_g, u_g = factor_eighs(kfac.layers, kfac.A, kfac.G)
    return EKFACBasis(dict(kfac.layers), u_a, u_g, lam_a, lam_g)


@dataclass(frozen=True)
class EKFAC:
    """EKFAC curvature: ``basis`` plus the fitted scaling S per target (g, o, i').

    fallback: ``Diag`` of the targets EKFAC cannot factor (or None); labels, examples: as
    for ``Diag``. Build it with ``fit_ekfac`` or ``refit_scaling``.
    """

    basis: EKFACBasis
    scaling: dict[str, Tensor]
    fallback: Diag | None
    labels: str
    examples: int

    @property
    def layers(self) -> dict[str, Layer]:
        """Geometry of the factored targets."""
        return self.basis.layers

    def kfe(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """(U_G, S, U_A) per factored target."""
        b = self.basis
        return {t: (b.u_g[t], self.scaling[t], b.u_a[t]) for t in self.layers}

    def _blocks(self) -> dict[str, dict[str, Tensor]]:
        return {
            t: block_to_params(self.layers[t], kfe_diagonal(*parts))
            for t, parts in self.kfe().items()
        }

    def diagonal(self) -> dict[str, Tensor]:
        """Fisher diagonal per target, (U_G∘U_G) S (U_A∘U_A)^T without the bias column."""
        out = {t: parts[t] for t, parts in self._blocks().items()}
        return {**out, **(self.fallback.diagonal() if self.fallback else {})}

    def bias_diagonal(self) -> dict[str, Tensor]:
        """Fisher diagonal of the bias column of each factored layer (bias name -> (out,))."""
        return {
            n: v
            for parts in self._blocks().values()
            for n, v in parts.items()
            if n not in self.layers
        }

    def inverse_diagonal(self, damping: float = 1e-3, absolute: float = 0.0) -> dict[str, Tensor]:
        """diag((F + lam I)^-1) = (U_G∘U_G) (1/(S+lam)) (U_A∘U_A)^T per target (weights).

        lam = damping * mean(S) + absolute, per target (relative damping keeps one setting
        meaningful across layers whose curvature differs by orders of magnitude).
        """
        return inverse_diagonal_of(self, damping, absolute)

    def estimators(self) -> dict[str, str]:
        """'ekfac' for factored targets, 'diag' for the fallback ones."""
        out = {t: "ekfac" for t in self.layers}
        return {**out, **(self.fallback.estimators() if self.fallback else {})}


def _layer_mask(layer: Layer, masks: Masks | None) -> Tensor | None:
    """Keep-mask as a (g, o, i') block (bias column kept), or None if nothing is pruned."""
    if masks is None or layer.target not in masks or bool(masks[layer.target].all()):
        return None
    return params_to_block(layer, masks[layer.target].float(), None, fill=1.0)


def _project(rows: Tensor, u: Tensor) -> Tensor:
    """rows (N, g, L, d) @ u (g, d, d) as one GEMM per group (broadcasting would run N*g
    matrix-vector products).

    All-zero rows (padded positions of sequences, whose rows ``stream_rows`` zeroed) project
    to zero, so with one group and d >= ``_SKIP_MIN_DIM`` only the nonzero rows go through
    the GEMM when they are at most 90% of all rows: exact. Measured on 61%-real encoder
    batches (2 threads): d = 1537 28.7 -> 22.3 ms; at d = 385 the scan and the gather cost
    more than the GEMM they save (1.8 -> 2.0 ms), hence the threshold.
    """
    n, groups, positions, dim = rows.shape
    if groups == 1 and positions > 1 and dim >= _SKIP_MIN_DIM:
        flat = rows.reshape(n * positions, dim)
        live = flat.ne(0).any(1)
        count = int(live.sum())
        if count <= 0.9 * live.numel():
            out = flat.new_zeros(flat.shape)
            out[live] = flat[live] @ u[0]
            return out.reshape(n, 1, positions, dim)
    flat = rows.transpose(0, 1).reshape(groups, n * positions, dim) @ u
    return flat.reshape(groups, n, positions, dim).transpose(0, 1)


def _projected_sq(g: Tensor, a: Tensor, u_g: Tensor, u_a: Tensor, mask: Tensor | None) -> Tensor:
    """sum_n (U_G^T [(sum_t g_nt a_nt^T) ∘ mask] U_A)^2: g (N,grp,L,o), a (N,grp,L,i').

    Without a mask, ``a`` must already be projected (a @ U_A, once per batch for all terms).
    Otherwise per-example gradients are built ``_CHUNK_ENTRIES`` entries at a time (bmm
    over positions), masked, projected on both sides (a broadcast matmul; measured at the
    machine's GEMM rate, ~100 GFLOP/s on one thread). The masked cost is inherent:
    N * o * i' * (o + i') multiply-adds, since (g a^T) ∘ M no longer factorises.
    """
    if mask is None:
        g = _project(g, u_g)  # project rows first: cheaper, and exact by linearity
        if g.shape[2] == 1:  # one position: the square of an outer product factorises
            return g[:, :, 0].pow(2).permute(1, 2, 0) @ a[:, :, 0].pow(2).transpose(0, 1)
    n, groups, _, rows = g.shape
    step = max(1, _CHUNK_ENTRIES // max(1, groups * rows * a.shape[-1]))
    acc = torch.zeros(groups, rows, a.shape[-1], dtype=g.dtype, device=g.device)
    for start in range(0, n, step):
        per_example = g[start : start + step].transpose(-1, -2) @ a[start : start + step]
        if mask is not None:
            per_example = u_g.transpose(-1, -2) @ (per_example * mask) @ u_a
        acc += per_example.square_().sum(0)  # in place: one chunk-sized buffer less
    return acc


def _keep_masks(layers: dict[str, Layer], masks: Masks | None, like: dict[str, Tensor]):
    """Per target: the (g, o, i') keep-mask in ``like``'s dtype/device, or None (unmasked)."""
    out = {}
    for t, ly in layers.items():
        m = _layer_mask(ly, masks)
        out[t] = m.to(dtype=like[t].dtype, device=like[t].device) if m is not None else None
    return out


class _BatchScaling:
    """One batch's S contribution of one target, added term by term; both S routes (kept
    rows, second pass) use it, so both give the same S.

    a: activation rows (N, grp, L, i'), projected once for all terms. One position and no
    mask: (U_G^T g)^2 is summed over the terms first and multiplied by (U_A^T a)^2 once, so
    C exact-label terms cost one (o x N x i') GEMM instead of C (linearity: exact).
    """

    def __init__(self, a: Tensor, u_g: Tensor, u_a: Tensor, mask: Tensor | None) -> None:
        self.rows = a if mask is not None else _project(a, u_a)
        self.u_g, self.u_a, self.mask = u_g, u_a, mask
        self.single = mask is None and a.shape[2] == 1
        self.total: Tensor | None = None

    def add(self, g: Tensor) -> None:
        """Add one label term's gradient rows g (N, grp, L, o)."""
        if self.single:
            part = _project(g, self.u_g)[:, :, 0].pow(2)  # (N, grp, o)
        else:
            part = _projected_sq(g, self.rows, self.u_g, self.u_a, self.mask)
        self.total = part if self.total is None else self.total.add_(part)

    def result(self) -> Tensor | None:
        """The (grp, o, i') sum over examples and terms; None if no term was added."""
        if self.total is None or not self.single:
            return self.total
        return self.total.permute(1, 2, 0) @ self.rows[:, :, 0].pow(2).transpose(0, 1)


def _batch_sq(a: Tensor, grads: Iterable[Tensor], u_g, u_a, mask) -> Tensor | None:
    """One batch's sum over examples and label terms of squared projected gradients.

    a: activation rows (N, grp, L, i'); grads: gradient rows (N, grp, L, o) per term.
    """
    batch = _BatchScaling(a, u_g, u_a, mask)
    for g in grads:
        batch.add(g)
    return batch.result()


def fit_scaling(
    model: nn.Module,
    task: Task,
    basis: EKFACBasis,
    batches: Iterable[Batch],
    *,
    labels: str,
    samples: int,
    generator: torch.Generator | LabelKey,
    masks: Masks | None = None,
) -> tuple[dict[str, Tensor], int]:
    """(S per target of ``basis`` (g, o, i'), examples seen); one streamed pass.

    masks (True = keep): pruned weights' per-example gradients are zeroed before projection.
    """
    dtype = accumulator_dtype(model)
    layers = basis.layers
    u_a = {t: u.to(dtype) for t, u in basis.u_a.items()}
    u_g = {t: u.to(dtype) for t, u in basis.u_g.items()}
    keep = _keep_masks(layers, masks, u_a)
    acc = {
        t: torch.zeros(ly.groups, ly.rows, ly.cols, dtype=dtype, device=u_a[t].device)
        for t, ly in layers.items()
    }
    seen = 0
    stream = stream_rows(
        model, task, layers, batches, labels=labels, samples=samples, generator=generator
    )
    for n, acts, _, terms in stream:  # S sums positions: no 1/T_n (module docstring)
        parts = {t: _BatchScaling(a, u_g[t], u_a[t], keep[t]) for t, a in acts.items()}
        for grads in terms:
            for t, g in grads.items():
                parts[t].add(g)
        for t, part in parts.items():
            value = part.result()
            if value is not None:
                acc[t] += value
        seen += n
    seen = all_reduce_sums(acc.values(), seen)
    if seen == 0:
        raise DataError("no examples to estimate the Fisher from (the data is empty)")
    return {t: s / seen for t, s in acc.items()}, seen


def _check_basis(basis: EKFACBasis, layers: dict[str, Layer]) -> EKFACBasis:
    """The part of ``basis`` covering ``layers``; ModelError if a layer has no basis."""
    missing = [t for t, ly in layers.items() if basis.layers.get(t) != ly]
    if missing:
        raise ModelError(
            f"the cached EKFAC eigenbasis does not cover targets {missing}; "
            "fit a new basis with fit_ekfac"
        )
    keep = list(layers)
    if keep == list(basis.layers):
        return basis
    return EKFACBasis(
        {t: basis.layers[t] for t in keep},
        {t: basis.u_a[t] for t in keep},
        {t: basis.u_g[t] for t in keep},
        {t: basis.lambda_a[t] for t in keep},
        {t: basis.lambda_g[t] for t in keep},
    )


def refit_scaling(
    curvature: EKFACBasis | EKFAC,
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    *,
    labels: str = "sampled",
    samples: int = 1,
    generator: torch.Generator | LabelKey | None = None,
    masks: Masks | None = None,
) -> EKFAC:
    """Keep the eigenbasis of ``curvature`` and fit S (and the diag fallback) on the data.

    targets: the factorable ones must be covered by the basis (ModelError otherwise);
    unfactorable ones get a fresh ``Diag``. masks (True = keep): pruned weights contribute
    nothing to S. Model state is left untouched.
    """
    check_labels(labels, task, samples)
    gen = LabelKey.of(generator)  # one key: the diag fallback draws the same labels
    basis = curvature.basis if isinstance(curvature, EKFAC) else curvature
    layers, rest = split_targets(model, targets)
    basis = _check_basis(basis, layers)
    if rest and layers:
        batches = reiterable(batches)
    scaling, seen = {}, 0
    if layers:
        scaling, seen = fit_scaling(
            model,
            task,
            basis,
            batches,
            labels=labels,
            samples=samples,
            generator=gen,
            masks=masks,
        )
    fallback = None
    if rest:
        fallback = fit_diag(
            model, task, rest, batches, labels=labels, samples=samples, generator=gen
        )
        seen = fallback.examples
    return EKFAC(basis, scaling, fallback, labels, seen)


class RowCache:
    """The rows of ``fit_factors``'s pass, kept per target and batch within a byte budget.

    Called by ``fit_factors`` once per batch with (activation rows (N, grp, L, i') per
    target, [gradient rows (N, grp, L, o) per target for each label term]). A target whose
    rows would push the total past ``budget`` bytes is dropped (its rows freed) and listed
    in ``dropped``; it needs a second pass. Memory per kept target: N*L*(i' + terms*o)
    floats (a Linear on 1000 MNIST examples: about 3 MB).
    """

    def __init__(self, targets: Iterable[str], budget: int) -> None:
        self.budget = int(budget)
        self.rows: dict[str, list[tuple[Tensor, list[Tensor]]]] = {t: [] for t in targets}
        self.dropped: set[str] = set()
        self.used = 0

    def __call__(self, acts: dict[str, Tensor], terms: list[dict[str, Tensor]]) -> None:
        for t, a in acts.items():
            if t in self.dropped:
                continue
            grads = [term[t] for term in terms]
            size = sum(x.numel() * x.element_size() for x in (a, *grads))
            if self.used + size > self.budget:
                self.used -= sum(
                    x.numel() * x.element_size() for a0, gs in self.rows[t] for x in (a0, *gs)
                )
                self.rows[t] = []
                self.dropped.add(t)
                continue
            self.used += size
            self.rows[t].append((a, grads))

    def scaling(self, basis: EKFACBasis, masks: Masks | None, seen: int) -> dict[str, Tensor]:
        """S (g, o, i') of every kept target from its rows, projected on ``basis``."""
        kept = {t: ly for t, ly in basis.layers.items() if t not in self.dropped}
        keep = _keep_masks(kept, masks, basis.u_a)
        out = {}
        for t, ly in kept.items():
            u_g, u_a = basis.u_g[t], basis.u_a[t]
            acc = torch.zeros(ly.groups, ly.rows, ly.cols, dtype=u_a.dtype, device=u_a.device)
            for a, grads in self.rows[t]:
                value = _batch_sq(a, grads, u_g, u_a, keep[t])
                if value is not None:
                    acc += value
            out[t] = acc
        all_reduce_sums(out.values(), 0)  # rows are this rank's shard; seen is already global
        return {t: acc / seen for t, acc in out.items()}


def fit_ekfac(
    model: nn.Module,
    task: Task,
    targets: dict[str, Target],
    batches: Iterable[Batch],
    *,
    labels: str = "sampled",
    samples: int = 1,
    generator: torch.Generator | LabelKey | None = None,
    masks: Masks | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> EKFAC:
    """Fit KFAC factors, eigendecompose them, then fit S in that basis -- in one pass.

    Labels as in ``fit_kfac``. The rows of the factor pass are kept (``RowCache``, at most
    ``cache_bytes``; 0 = keep none) and S is fitted from them, so basis and S see the same
    examples and labels. Targets whose rows do not fit get a second streamed pass that
    draws the same labels (keyed by example: ``types.LabelKey``), so the same S. A one-shot
    iterable of batches is materialised (it may be read twice). masks (True = keep):
    pruned weights contribute nothing to S (the basis is fitted unmasked). Extra memory:
    O(sum in'^2 + out^2) per layer, one batch of rows, and the cache.
    """
    check_labels(labels, task, samples)
    gen = LabelKey.of(generator)  # every pass below draws the same labels from this key
    batches = reiterable(batches)
    layers, rest = split_targets(model, targets)
    kw = {"labels": labels, "samples": samples}
    if not layers:
        basis = EKFACBasis({}, {}, {}, {}, {})
        return refit_scaling(basis, model, task, targets, batches, generator=gen, **kw)
    cache = RowCache(layers, cache_bytes)
    a, g, seen = fit_factors(model, task, layers, batches, generator=gen, keep=cache, **kw)
    basis = eigenbasis(KFAC(layers, a, g, None, labels, seen))
    scaling = cache.scaling(basis, masks, seen)
    del cache
    missing = {t: ly for t, ly in layers.items() if t not in scaling}
    if missing:
        sub = _check_basis(basis, missing)
        more, _ = fit_scaling(model, task, sub, batches, generator=gen, masks=masks, **kw)
        scaling.update(more)
    fallback = None
    if rest:
        fallback = fit_diag(model, task, rest, batches, generator=gen, **kw)
    return EKFAC(basis, scaling, fallback, labels, fallback.examples if fallback else seen)
