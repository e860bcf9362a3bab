"""Joint OBS weight updates and SparseGPT: pure tensor functions (methods.md 9.1-9.3).

Conventions (criteria/kfac.py "Conventions"): a layer is a block ``W`` of shape (o, i'),
the bias, when there is one, as its LAST column; vec is row-major, so a Kronecker curvature
is ``kron(G, A)`` and acts on a block as ``V -> G V A``. Keep masks are bool, True = keep.

Layer-reconstruction form (OBC, SparseGPT). With calibration inputs X (i' x N) the error of
a new block W' is ``||(W - W') X||^2 = sum_r (w_r - w'_r)^T H (w_r - w'_r)``, H = X X^T
(any positive multiple of KFAC's A gives the same updates): the rows are independent
quadratics with one shared H. Removing the set Q of a row (w'_Q = 0) and refitting the kept
set S gives

    w'_S = w_S + H_SS^-1 H_SQ w_Q,

which equals the joint OBS update  delta = -H^-1 E_Q (E_Q^T H^-1 E_Q)^-1 w_Q  of
methods.md 9.1 (all of Q removed at once, correlations between removed weights included).

Damping. Every function adds ``lam * I`` to the curvature with ``lam = damping * mean(diag
H)`` (for a Kronecker or eigenbasis form: the mean of its eigenvalues, as
``criteria.diag.damping_value``); a curvature that is not positive definite after damping
is a SettingError naming the damping. Computation is float64; results have the weight's
dtype, removed entries exactly 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from prunekit.criteria.diag import damping_value
from prunekit.errors import SettingError, int_setting

log = logging.getLogger(__name__)

Matvec = Callable[[Tensor], Tensor]

# Largest number of float64 entries of the padded (rows, |S|, |S|) systems solved at once.
_SOLVE_ENTRIES = 1 << 23


def check_damping(damping: float) -> float:
    """``damping`` as a float if finite and >= 0; SettingError otherwise."""
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(damping, bool) or not math.isfinite(value) or value < 0:
        raise SettingError(f"damping {damping!r} must be a finite number >= 0 (e.g. 0.01)")
    return value


def damped_hessian(hessian: Tensor, damping: float) -> Tensor:
    """float64 ``(H + H^T)/2 + lam I``, lam = damping * mean(diag H) (damping if that is 0).

    hessian: (i', i') positive semi-definite. The absolute fallback keeps an all-zero H
    (a layer whose inputs were all zero) solvable.
    """
    damping = check_damping(damping)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise SettingError(f"hessian of shape {tuple(hessian.shape)} must be square (i', i')")
    h = hessian.detach().double()
    h = (h + h.T) / 2
    mean = float(h.diagonal().mean()) if h.numel() else 0.0
    lam = damping * mean if mean > 0 else damping
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def cholesky_of(h: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of the damped ``h``; SettingError if it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        raise SettingError(
            f"the layer's Hessian is not positive definite with damping {damping!r}; "
            "use a larger damping (e.g. 0.01)"
        )
    return factor


def _check_block(weight: Tensor, keep: Tensor, hessian: Tensor | None = None) -> Tensor:
    if weight.ndim != 2 or tuple(keep.shape) != tuple(weight.shape):
        raise SettingError(
            f"weight {tuple(weight.shape)} and keep {tuple(keep.shape)} must be one (o, i') shape"
        )
    if hessian is not None and tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise SettingError(
            f"hessian {tuple(hessian.shape)} does not match the block's {weight.shape[1]} columns"
        )
    return keep.bool()


def joint_obs_rows(weight: Tensor, hessian: Tensor, keep: Tensor, damping: float = 0.01) -> Tensor:
    """Joint OBS update of every row against one shared input Hessian.

    weight: (o, i') block (bias as last column; keep it True in ``keep``); hessian: (i', i')
    PSD, e.g. ``X X^T`` or KFAC's A; keep: bool (o, i'), True = keep, any number per row.
    Returns the (o, i') block, weight's dtype: removed entries exactly 0, each row's kept
    entries ``w_S + H_SS^-1 H_SQ w_Q`` with the damped H (module docstring), i.e. the
    minimiser of ``(w - w')^T H (w - w')`` with w'_Q = 0. Each row is solved in the smaller
    of two equal forms: the kept set (|S| x |S| system of H) or the removed set (the
    |Q| x |Q| system of H^-1: delta = -H^-1 E_Q ([H^-1]_QQ)^-1 w_Q), so a row costs
    min(|S|, |Q|)^3, not |S|^3; rows are solved in batches of similar size, padded with
    identity rows, by Cholesky in float64.
    """
    keep = _check_block(weight, keep, hessian)
    h = damped_hessian(hessian, damping)
    factor = cholesky_of(h, damping)  # principal submatrices of a PD matrix are PD
    w = weight.detach().double()
    out = torch.where(keep, w, torch.zeros_like(w))
    sizes = keep.sum(1)
    removed = keep.shape[1] - sizes
    by_kept = (sizes <= removed) & (removed > 0)
    if bool(by_kept.any()):
        rhs = torch.where(keep, torch.zeros_like(w), w) @ h  # row r: (H w_Q)^T, H symmetric
        cols = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # S first
        _in_chunks(
            by_kept,
            sizes,
            lambda rows, m: _solve_rows(out, rhs, h, rows, cols[rows, :m], sizes[rows]),
            lambda m: m * m,
        )
    by_removed = (sizes > removed) & (removed > 0)
    if bool(by_removed.any()):
        hinv = torch.cholesky_inverse(factor)
        cols = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # Q first
        width = w.shape[1]  # each row also gathers m rows of H^-1
        _in_chunks(
            by_removed,
            removed,
            lambda rows, m: _solve_removed(out, w, hinv, rows, cols[rows, :m], removed[rows]),
            lambda m: m * m + m * width,
        )
    return torch.where(keep, out, torch.zeros_like(out)).to(weight.dtype)


def obs_rows_fast(
    weight: Tensor, hessian: Tensor, keep: Tensor, damping: float = 0.01, exact_max: int = 64
) -> Tensor:
    """The joint row update of ``joint_obs_rows`` where it is cheap, SparseGPT's sequential
    one elsewhere: rows with min(|S|, |Q|) <= ``exact_max`` are solved exactly; the others
    get the column-by-column OBS pass of ``sparsegpt_rows`` with the mask fixed (no new
    choice: each removed entry's error goes to the later columns through the Cholesky
    factor of H^-1, the earlier ones keep their values). Cost per layer: one (i', i')
    inverse and O(o i'^2) for the pass instead of o |S|^3. Same arguments and result
    contract as ``joint_obs_rows``.
    """
    keep = _check_block(weight, keep, hessian)
    kept = keep.sum(1)
    exact = torch.minimum(kept, keep.shape[1] - kept) <= int_setting(exact_max, "exact_max", 0)
    out = torch.empty_like(weight)
    if bool(exact.any()):
        out[exact] = joint_obs_rows(weight[exact], hessian, keep[exact], damping)
    if not bool(exact.all()):
        rest = ~exact
        # most-removed columns first: a removed entry's error can only go to later columns,
        # and a row whose removed entries all precede its kept ones gets its exact update
        order = torch.argsort(keep[rest].sum(0), stable=True)
        back = torch.argsort(order)
        n_prune = int((~keep[rest]).sum())
        h = hessian[order][:, order]
        w, k = weight[rest][:, order], keep[rest][:, order]
        out[rest] = sparsegpt_rows(w, h, n_prune, k, damping=damping)[0][:, back]
    return out


def _in_chunks(selected: Tensor, sizes: Tensor, solve, entries) -> None:
    """Call ``solve(rows, m)`` on chunks of the ``selected`` rows sorted by ``sizes``, each
    chunk within ``_SOLVE_ENTRIES`` float64 entries (one row at least), a row of padded
    size m holding ``entries(m)`` of them."""
    order = torch.nonzero(selected).flatten()
    order = order[torch.argsort(sizes[order], stable=True)]
    sorted_sizes = sizes[order].tolist()
    start = 0
    while start < len(order):
        stop = start + 1  # rows sorted by size: grow the chunk while its padded systems fit
        while (
            stop < len(order) and (stop - start + 1) * entries(sorted_sizes[stop]) <= _SOLVE_ENTRIES
        ):
            stop += 1
        rows = order[start:stop]
        solve(rows, int(sizes[rows].max()))
        start = stop


def _padded_system(mat: Tensor, idx: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sub, valid, idx): ``mat[S, S]`` per row for the first ``sizes`` entries of ``idx``,
    padded with identity rows and columns to one length; ``valid`` marks the real entries."""
    m = idx.shape[1]
    valid = torch.arange(m, device=idx.device)[None, :] < sizes[:, None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    sub = mat[idx[:, :, None], idx[:, None, :]]
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(m, dtype=mat.dtype, device=mat.device).expand_as(sub)
    return torch.where(pair, sub, eye), valid, idx


def _solve_rows(out: Tensor, rhs: Tensor, h: Tensor, rows: Tensor, idx: Tensor, sizes: Tensor):
    """out[rows, S] += H_SS^-1 (H w_Q)_S for a chunk of rows, S padded to one length m."""
    sub, valid, idx = _padded_system(h, idx, sizes)
    b = torch.where(valid, rhs[rows].gather(1, idx), torch.zeros((), dtype=h.dtype))
    delta = torch.cholesky_solve(b[..., None], torch.linalg.cholesky(sub))[..., 0]
    part = out[rows]
    part.scatter_add_(1, idx, torch.where(valid, delta, torch.zeros((), dtype=h.dtype)))
    out[rows] = part


def _solve_removed(out: Tensor, w: Tensor, hinv: Tensor, rows: Tensor, idx: Tensor, sizes: Tensor):
    """out[rows] += -H^-1 E_Q ([H^-1]_QQ)^-1 w_Q for a chunk of rows, Q padded to length m."""
    sub, valid, idx = _padded_system(hinv, idx, sizes)
    b = torch.where(valid, w[rows].gather(1, idx), torch.zeros((), dtype=w.dtype))
    x = torch.cholesky_solve(b[..., None], torch.linalg.cholesky(sub))[..., 0]
    x = torch.where(valid, x, torch.zeros((), dtype=w.dtype))
    out[rows] -= torch.einsum("rm,rmd->rd", x, hinv[idx])


def obs_saliency(weight: Tensor, hessian: Tensor, damping: float = 0.01) -> Tensor:
    """Single-weight OBS saliency ``w_q^2 / [H^-1]_qq`` (o, i'), float64 (higher = keep).

    weight: (o, i') block; hessian: (i', i'), damped as in the module docstring.
    """
    h = damped_hessian(hessian, damping)
    inv_diag = torch.cholesky_inverse(cholesky_of(h, damping)).diagonal()
    return weight.detach().double().pow(2) / inv_diag


def prune_lowest(score: Tensor, keep: Tensor, eligible: Tensor, n_prune: int) -> Tensor:
    """Keep-mask (score's shape) with exactly ``n_prune`` False: the already-pruned entries
    (keep False) plus the lowest-scoring ``eligible`` kept ones (ties by position, stable).

    SettingError when ``n_prune`` is below the pruned count or above what can be pruned.
    """
    keep = keep.bool().reshape(-1)
    free = (keep & eligible.bool().reshape(-1)).reshape(-1)
    n_new = check_count(n_prune, int((~keep).sum()), int(free.sum()))
    inf = torch.full(keep.shape, math.inf, dtype=torch.float64, device=keep.device)
    ranked = torch.where(free, score.double().reshape(-1), inf)
    new_keep = keep.clone()
    new_keep[torch.sort(ranked, stable=True).indices[:n_new]] = False
    return new_keep.reshape(score.shape)


def check_count(n_prune: int, pruned: int, free: int, what: str = "n_prune") -> int:
    """The number of NEW entries to prune: ``n_prune - pruned``, checked to lie in [0, free]."""
    n = int_setting(n_prune, what, 0)
    if n < pruned:
        raise SettingError(
            f"{what} {n} is below the {pruned} entries already pruned (masks only grow)"
        )
    if n - pruned > free:
        raise SettingError(
            f"{what} {n} is larger than the {pruned + free} entries that can be pruned"
        )
    return n - pruned


def _cg(op: Matvec, b: Tensor, tol: float, max_iter: int, inv_diag: Tensor | None) -> Tensor:
    """(Jacobi-preconditioned) conjugate gradients for the PD ``op``, from x = 0.

    Stops when ``||r|| <= tol ||b||``; a non-positive curvature direction is a SettingError.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    z = r if inv_diag is None else r * inv_diag
    p = z.clone()
    rz = float((r * z).sum())
    bb = float((b * b).sum())
    rr = bb
    for _ in range(max_iter):
        if rr <= tol**2 * bb or rr == 0.0:
            return x
        hp = op(p)
        curv = float((p * hp).sum())
        if not curv > 0:
            raise SettingError(
                "the curvature is not positive definite on the kept weights; "
                "use a larger damping (e.g. 0.01)"
            )
        alpha = rz / curv
        x += alpha * p
        r -= alpha * hp
        z = r if inv_diag is None else r * inv_diag
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz, rr = rz_new, float((r * r).sum())
    if rr > tol**2 * bb:
        log.debug(
            "joint_obs_kron: CG stopped after %d iterations at relative residual %.3g",
            max_iter,
            math.sqrt(rr / bb),
        )
    return x


class BlockMatvec:
    """A matrix-free curvature product ``V -> H V`` on blocks with its diagonal (o, i') for
    Jacobi preconditioning; ``joint_obs_kron`` accepts it or any plain callable."""

    def __init__(self, apply: Matvec, diagonal: Tensor) -> None:
        self.apply, self.diagonal = apply, diagonal

    def __call__(self, v: Tensor) -> Tensor:
        """H V for a float64 block V."""
        return self.apply(v)


def joint_obs_kron(
    weight: Tensor, matvec: Matvec, keep: Tensor, *, tol: float = 1e-8, max_iter: int = 200
) -> Tensor:
    """Joint OBS update of a whole block under a general PD curvature given matrix-free.

    weight: (o, i') block (or any shape ``matvec`` accepts, e.g. (groups, o, i')); matvec:
    ``V -> H V`` on float64 tensors of weight's shape, H PD and damped already
    (``kron_matvec``, ``ekfac_matvec``); keep: bool, weight's shape, True = keep.
    Minimises ``1/2 delta^T H delta`` subject to ``delta_Q = -theta_Q``: solves
    ``H_SS delta_S = H_SQ theta_Q`` by conjugate gradients on the kept coordinates (relative
    residual ``tol``, at most ``max_iter`` steps; Jacobi-preconditioned when ``matvec`` has
    a ``diagonal`` (o, i') attribute, as ``BlockMatvec`` does). Returns weight + delta,
    weight's dtype, removed entries exactly 0.
    """
    keep = keep.bool()
    if tuple(keep.shape) != tuple(weight.shape):
        raise SettingError(
            f"keep {tuple(keep.shape)} must have weight's shape {tuple(weight.shape)}"
        )
    max_iter = int_setting(max_iter, "max_iter", 1)
    zero = torch.zeros((), dtype=torch.float64, device=weight.device)
    theta = weight.detach().double()
    removed = torch.where(keep, zero, theta)

    def op(v: Tensor) -> Tensor:
        return torch.where(keep, matvec(torch.where(keep, v, zero)), zero)

    b = torch.where(keep, matvec(removed), zero)
    diagonal = getattr(matvec, "diagonal", None)
    inv_diag = None if diagonal is None else 1.0 / diagonal.double().expand_as(b)
    delta = _cg(op, b, float(tol), max_iter, inv_diag)
    return torch.where(keep, theta + delta, zero).to(weight.dtype)


def kron_matvec(G: Tensor, A: Tensor, damping: float = 0.01) -> BlockMatvec:
    """``V -> (kron(G, A) + lam I) vec V`` as a block: ``G V A + lam V`` (float64).

    G: (o, o) or (groups, o, o); A: (i', i') or (groups, i', i'); V: (o, i') or (groups, o,
    i'). lam = damping * mean eigenvalue of kron(G, A) = damping * mean(diag G x diag A).
    """
    g, a = G.detach().double(), A.detach().double()
    values = g.diagonal(dim1=-2, dim2=-1)[..., :, None] * a.diagonal(dim1=-2, dim2=-1)[..., None, :]
    lam = damping_value(values, check_damping(damping), 0.0)
    return BlockMatvec(lambda v: g @ v @ a.transpose(-1, -2) + lam * v, values + lam)


def ekfac_matvec(u_g: Tensor, scale: Tensor, u_a: Tensor, damping: float = 0.01) -> BlockMatvec:
    """``V -> U_G [(U_G^T V U_A) * (S + lam)] U_A^T``: EKFAC (or KFAC in its eigenbasis).

    u_g: (o, o), scale: (o, i') eigenvalues S, u_a: (i', i') (or with a leading groups
    dim, as ``KFAC.kfe()`` gives); lam = damping * mean(S) (``damping_value``).
    """
    ug, s, ua = u_g.detach().double(), scale.detach().double(), u_a.detach().double()
    shifted = s + damping_value(s, check_damping(damping), 0.0)
    diagonal = ug.pow(2) @ shifted @ ua.pow(2).transpose(-1, -2)  # kfac.kfe_diagonal

    def apply(v: Tensor) -> Tensor:
        return ug @ ((ug.transpose(-1, -2) @ v @ ua) * shifted) @ ua.transpose(-1, -2)

    return BlockMatvec(apply, diagonal)


def _block_quotas(w: Tensor, d: Tensor, free: Tensor, n_new: int, block: int) -> list[int]:
    """How many new entries each column block prunes: the n_new lowest ``w^2 / U_qq^2`` of
    the free entries, ranked once up-front over the whole layer, counted per block."""
    n = w.shape[1]
    quotas = [0] * math.ceil(n / block)
    if n_new == 0:
        return quotas
    score = torch.where(free, w.pow(2) / d.pow(2), torch.full_like(w, math.inf))
    chosen = torch.sort(score.reshape(-1), stable=True).indices[:n_new] % n
    for b, c in enumerate(torch.bincount(chosen // block, minlength=len(quotas)).tolist()):
        quotas[b] = c
    return quotas


def _select(prune: Tensor, free: Tensor, w1: Tensor, d1: Tensor, start: int, quota: int):
    """Mark the ``quota`` lowest ``w^2 / d^2`` free, unpruned entries of columns start.. of
    the current block ``w1`` (o, c) as pruned (in ``prune``, columns start..start+c)."""
    cols = slice(start, start + w1.shape[1])
    score = torch.where(
        free[:, cols] & ~prune[:, cols], w1.pow(2) / d1.pow(2), torch.full_like(w1, math.inf)
    )
    local = prune[:, cols].reshape(-1)
    local[torch.sort(score.reshape(-1), stable=True).indices[:quota]] = True
    prune[:, cols] = local.reshape(w1.shape)


def sparsegpt_rows(
    weight: Tensor,
    hessian: Tensor,
    n_prune: int,
    keep: Tensor | None = None,
    *,
    block: int = 128,
    damping: float = 0.01,
    frozen_last_column: bool = False,
    mask_block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one (o, i') block -> (weight, keep).

    weight: (o, i'); hessian: (i', i') PSD input Hessian (damped, module docstring);
    n_prune: total pruned entries wanted, already-pruned ones (keep False) included; keep:
    bool (o, i') current mask or None (all kept); frozen_last_column: the bias column, never
    pruned (still updated). U = upper Cholesky factor of H^-1. Columns are walked in
    blocks of ``block`` (lazy batch updates: a speed knob, the result does not depend on
    it; rounded down to a multiple of ``mask_block``, at least one). At the start of every
    ``mask_block`` columns (default: ``block``) their new entries are chosen as the lowest
    ``w^2 / U_qq^2`` of the current, already updated weights (adaptive mask selection;
    smaller = more adaptive). Per column j, ``err = w_j / U_jj`` on the pruned rows and
    ``w[:, j:block end] -= err U_j,j:``; the block's errors then update the later columns
    at once.

    Spread of n_prune over mask blocks (exact count): the new entries are first ranked once
    by ``w^2 / U_qq^2`` over the whole layer and each mask block prunes as many as it holds
    of the lowest n_prune - pruned; which ones inside it is decided adaptively as above.
    Returns the updated block (weight's dtype, pruned entries exactly 0) and the keep mask
    with exactly n_prune False.
    """
    keep = _check_block(
        weight, torch.ones_like(weight, dtype=torch.bool) if keep is None else keep, hessian
    ).clone()
    block = int_setting(block, "block", 1)
    mask_block = block if mask_block is None else int_setting(mask_block, "mask_block", 1)
    block = max(block // mask_block, 1) * mask_block  # mask blocks never straddle two
    free = keep.clone()
    if frozen_last_column:
        if not bool(keep[:, -1].all()):
            raise SettingError("the frozen last column (the bias) must be kept in keep")
        free[:, -1] = False
    n_new = check_count(n_prune, int((~keep).sum()), int(free.sum()))
    h = damped_hessian(hessian, damping)
    hinv = torch.cholesky_inverse(cholesky_of(h, damping))
    u = cholesky_of(hinv, damping).T  # upper: H^-1 = U^T U
    w = weight.detach().double().clone()
    prune = ~keep
    quotas = _block_quotas(w, u.diagonal(), free, n_new, mask_block)
    n = w.shape[1]
    for start in range(0, n, block):
        stop = min(start + block, n)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        err = torch.zeros_like(w1)
        for j in range(stop - start):
            col = start + j
            q = quotas[col // mask_block] if col % mask_block == 0 else 0
            if q:  # a mask block starts here; it ends inside this lazy block
                c = slice(j, min(j + mask_block, stop - start))
                _select(prune, free, w1[:, c], u1.diagonal()[c], col, q)
            e = torch.where(prune[:, col], w1[:, j], 0.0) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, start:stop] = w1
        w[:, stop:] -= err @ u[start:stop, stop:]
    w = torch.where(prune, torch.zeros_like(w), w)
    return w.to(weight.dtype), ~prune
