"""Eigendecompositions of KFAC factors, spread over the ranks of a torch.distributed job.

Every rank holds the same all-reduced factors, so without care every rank would run every
``eigh`` (the dominant cost of an EKFAC basis on large layers, ~n^3 each). Under
torch.distributed (initialised, world > 1) ``eigh_factors`` instead gives each factor (A
and G of a layer are separate jobs) to one rank by a greedy balance of the n^3 cost
(``assign_by_cost``), lets every rank decompose its own, and broadcasts each result from
its owner. ``eigh`` is deterministic for identical input on one machine, so the results
are bit-identical across ranks and equal to a one-process run's.

Collective: in a job, every rank must call ``eigh_factors`` with the same keys in the same
order and matrices of the same shapes and dtypes (the curvature code calls it from
``eigenbasis`` and ``KFAC.kfe``, which every rank runs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def symmetric_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues clamped at 0, eigenvectors) of a batch of PSD matrices, in m's dtype.

    Rounding can make tiny eigenvalues of a PSD matrix negative; they are clamped to 0.
    A float32 factor with many exactly-zero rows (the output factor G of a layer whose
    units were all pruned) can make float32 ``eigh`` fail to converge or return NaN; it is
    then decomposed in float64 and cast back (deterministic: same input, same path).
    """
    try:
        vals, vecs = torch.linalg.eigh(m)
        ok = bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all())
    except torch.linalg.LinAlgError:
        ok = False
    if not ok and m.dtype != torch.float64:
        vals, vecs = (t.to(m.dtype) for t in torch.linalg.eigh(m.double()))
    return vals.clamp_min(0), vecs


def assign_by_cost(costs: dict[str, float], world: int) -> dict[str, int]:
    """Owner rank of each job: largest cost first, each to the least-loaded rank so far.

    Deterministic (same result on every rank): jobs of equal cost are taken in key order,
    and a tie between ranks' loads goes to the lowest rank. Keys keep ``costs``' order.
    ValueError if ``world`` < 1 or a cost is negative or not finite.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, not {world}")
    bad = {k: c for k, c in costs.items() if not (math.isfinite(c) and c >= 0)}
    if bad:
        raise ValueError(f"job costs must be finite and >= 0; got {bad}")
    load = [0.0] * world
    owner: dict[str, int] = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += costs[key]
    return {k: owner[k] for k in costs}


def eigh_cost(m: Tensor) -> float:
    """Relative cost of ``symmetric_eigh(m)`` for a batch (..., n, n): batch size * n^3."""
    return float(math.prod(m.shape[:-2])) * float(m.shape[-1]) ** 3


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eigh_factors(factors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``symmetric_eigh`` of every factor (name -> (..., n, n) PSD), keyed like ``factors``.

    In a multi-process job each factor is decomposed on the rank ``assign_by_cost`` gives
    it and broadcast from there (module docstring: a collective call). Eigenvectors keep
    eigh's memory layout on every rank (they travel transposed, which is contiguous).
    """
    rank, world = _rank_and_world()
    if world == 1:
        return {k: symmetric_eigh(m) for k, m in factors.items()}
    import torch.distributed as dist

    owners = assign_by_cost({k: eigh_cost(m) for k, m in factors.items()}, world)
    # Own jobs first, then the broadcasts: no rank waits on a result it has yet to compute.
    mine = {k: symmetric_eigh(m) for k, m in factors.items() if owners[k] == rank}
    out, pending = {}, []
    for key, m in factors.items():  # same order on every rank, so the collectives pair up
        if owners[key] == rank:
            vals, vecs = mine[key]
            vals, vecs_t = vals.contiguous(), vecs.mT.contiguous()
        else:
            vals = torch.empty(m.shape[:-1], dtype=m.dtype, device=m.device)
            vecs_t = torch.empty(m.shape, dtype=m.dtype, device=m.device)
        pending.append(dist.broadcast(vals, owners[key], async_op=True))
        pending.append(dist.broadcast(vecs_t, owners[key], async_op=True))
        out[key] = (vals, vecs_t.mT)
    for work in pending:
        work.wait()
    return out


def factor_eighs(layers, a: dict[str, Tensor], g: dict[str, Tensor]):
    """Eigendecompositions of each layer's A and G (two jobs per layer, ``eigh_factors``).

    Returns (lambda_A, U_A, lambda_G, U_G), each a dict keyed by target name (``layers``).
    """
    jobs = {f"A:{t}": a[t] for t in layers} | {f"G:{t}": g[t] for t in layers}
    done = eigh_factors(jobs)
    lam_a = {t: done[f"A:{t}"][0] for t in layers}
    u_a = {t: done[f"A:{t}"][1] for t in layers}
    lam_g = {t: done[f"G:{t}"][0] for t in layers}
    u_g = {t: done[f"G:{t}"][1] for t in layers}
    return lam_a, u_a, lam_g, u_g
