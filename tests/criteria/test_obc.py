"""criteria.obc: joint OBS updates and SparseGPT against dense float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from prunekit.criteria import obc
from prunekit.criteria.obc import (
    ekfac_matvec,
    joint_obs_kron,
    joint_obs_rows,
    kron_matvec,
    sparsegpt_rows,
)
from prunekit.errors import SettingError

D = torch.float64


def correlated_inputs(n: int, samples: int, seed: int, bias: bool = True) -> Tensor:
    """(n, samples) inputs with strongly correlated features (last row ones with a bias)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=D) + 2.0 * torch.eye(n, dtype=D)
    x = mix @ torch.randn(n, samples, generator=g, dtype=D) + 0.5
    if bias:
        x[-1] = 1.0
    return x


def dense_obs(h: Tensor, theta: Tensor, removed: Tensor) -> tuple[Tensor, float]:
    """methods.md 9.1: delta = -H^-1 E_Q (E_Q^T H^-1 E_Q)^-1 theta_Q and 1/2 theta_Q^T (...)^-1
    theta_Q, with explicit matrices (vec of whatever shape theta has)."""
    hinv = torch.linalg.inv(h)
    q = removed.reshape(-1).nonzero().flatten()
    e = torch.eye(h.shape[0], dtype=D)[:, q]
    inner = e.T @ hinv @ e
    tq = theta.reshape(-1)[q]
    delta = -hinv @ e @ torch.linalg.solve(inner, tq)
    return delta.reshape(theta.shape), 0.5 * float(tq @ torch.linalg.solve(inner, tq))


def row_masks(o: int, n: int, seed: int) -> Tensor:
    """Keep masks with a different number removed per row, bias column kept, one dense row."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(o, n, dtype=torch.bool)
    for r in range(o):
        k = r % (n - 1)  # 0 .. n-2 removed, never the bias
        keep[r, torch.randperm(n - 1, generator=g)[:k]] = False
    return keep


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_joint_obs_rows_equals_dense_obs_per_row(damping):
    o, n = 7, 8
    x = correlated_inputs(n, 40, seed=1)
    h = x @ x.T
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(2), dtype=D)
    keep = row_masks(o, n, seed=3)
    out = joint_obs_rows(w, h, keep, damping=damping)
    hd = h + damping * h.diagonal().mean() * torch.eye(n, dtype=D)
    assert bool((out[~keep] == 0).all())
    for r in range(o):
        if keep[r].all():
            assert torch.equal(out[r], w[r])
            continue
        delta, loss = dense_obs(hd, w[r], ~keep[r])
        torch.testing.assert_close(out[r], w[r] + delta, atol=1e-10, rtol=0)
        d = out[r] - w[r]
        assert abs(0.5 * float(d @ hd @ d) - loss) <= 1e-10 * max(1.0, loss)


def test_joint_obs_rows_chunks_rows_the_same_way(monkeypatch):
    """Small chunks of padded systems (several sizes per chunk) give the same rows."""
    o, n = 9, 6
    x = correlated_inputs(n, 30, seed=4)
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(5), dtype=D)
    keep = row_masks(o, n, seed=6)
    whole = joint_obs_rows(w, x @ x.T, keep)
    monkeypatch.setattr(obc, "_SOLVE_ENTRIES", 40)
    torch.testing.assert_close(joint_obs_rows(w, x @ x.T, keep), whole, atol=1e-12, rtol=0)


def test_joint_obs_rows_keeps_dtype_and_zeroes_fully_removed_rows():
    x = correlated_inputs(5, 20, seed=7)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False
    out = joint_obs_rows(w, (x @ x.T).float(), keep)
    assert out.dtype == torch.float32
    assert bool((out[1] == 0).all())
    torch.testing.assert_close(out[0], w[0])


def spd(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D)
    return m @ m.T + 0.1 * torch.eye(n, dtype=D)


def block_mask(o: int, n: int, seed: int) -> Tensor:
    keep = torch.rand(o, n, generator=torch.Generator().manual_seed(seed)) > 0.45
    keep[0, 0], keep[-1, -1] = False, True
    return keep


def test_joint_obs_kron_equals_dense_solution():
    o, n = 3, 4
    G, A = spd(o, 10), spd(n, 11)
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(12), dtype=D)
    keep = block_mask(o, n, 13)
    damping = 0.02
    lam = damping * float(G.diagonal().mean() * A.diagonal().mean())
    h = torch.kron(G, A) + lam * torch.eye(o * n, dtype=D)
    out = joint_obs_kron(w, kron_matvec(G, A, damping), keep, tol=1e-14)
    delta, loss = dense_obs(h, w, ~keep)
    torch.testing.assert_close(out, w + delta, atol=1e-8, rtol=0)
    assert bool((out[~keep] == 0).all())
    d = (out - w).reshape(-1)
    assert abs(0.5 * float(d @ h @ d) - loss) <= 1e-8 * max(1.0, loss)


def test_joint_obs_kron_equals_dense_solution_in_the_ekfac_form():
    o, n = 3, 5
    g = torch.Generator().manual_seed(20)
    u_g = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=D)).Q
    u_a = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D)).Q
    scale = torch.rand(o, n, generator=g, dtype=D) + 0.05
    w = torch.randn(o, n, generator=g, dtype=D)
    keep = block_mask(o, n, 21)
    damping = 0.01
    lam = damping * float(scale.mean())
    q = torch.kron(u_g, u_a)
    h = q @ torch.diag(scale.reshape(-1) + lam) @ q.T
    out = joint_obs_kron(w, ekfac_matvec(u_g, scale, u_a, damping), keep, tol=1e-14)
    delta, _ = dense_obs(h, w, ~keep)
    torch.testing.assert_close(out, w + delta, atol=1e-8, rtol=0)


def test_joint_obs_rows_is_joint_obs_kron_with_identity_g():
    """With G = I the Kronecker problem splits into the rows of the A-factor form."""
    o, n = 4, 6
    x = correlated_inputs(n, 25, seed=30)
    a = x @ x.T / 25
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(31), dtype=D)
    keep = row_masks(o, n, seed=32)
    rows = joint_obs_rows(w, a, keep, damping=0.01)
    kron = joint_obs_kron(w, kron_matvec(torch.eye(o, dtype=D), a, 0.01), keep, tol=1e-14)
    torch.testing.assert_close(kron, rows, atol=1e-9, rtol=0)


def sequential_reference(w: Tensor, h: Tensor, prune: Tensor) -> Tensor:
    """SparseGPT's sequence without Cholesky or blocks: column j in order, each pruned
    entry removed by OBS with the inverse Hessian of columns j.. (the ones still free)."""
    w = w.clone()
    n = w.shape[1]
    for j in range(n):
        hinv = torch.linalg.inv(h[j:, j:])
        for r in range(w.shape[0]):
            if prune[r, j]:
                w[r, j:] -= w[r, j] / hinv[0, 0] * hinv[0]
    return torch.where(prune, torch.zeros_like(w), w)


@pytest.mark.parametrize("block", [8, 3])
def test_sparsegpt_rows_with_a_fixed_mask_equals_the_sequential_reference(block):
    o, n = 5, 8
    x = correlated_inputs(n, 30, seed=40)
    h = x @ x.T
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(41), dtype=D)
    keep = row_masks(o, n, seed=42)
    damping = 0.01
    hd = h + damping * h.diagonal().mean() * torch.eye(n, dtype=D)
    out, new_keep = sparsegpt_rows(
        w, h, int((~keep).sum()), keep, block=block, damping=damping, frozen_last_column=True
    )
    assert torch.equal(new_keep, keep)
    torch.testing.assert_close(out, sequential_reference(w, hd, ~keep), atol=1e-10, rtol=0)


def output_error(w: Tensor, new: Tensor, x: Tensor) -> float:
    return float(((w - new) @ x).pow(2).sum() / (w @ x).pow(2).sum())


@pytest.mark.parametrize("block", [4, 128])
def test_sparsegpt_rows_counts_masks_and_beats_no_update_and_magnitude(block):
    o, n = 12, 16
    x = correlated_inputs(n, 200, seed=50)
    h = x @ x.T
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(51), dtype=D)
    start = torch.ones(o, n, dtype=torch.bool)
    start[:, :2] = False  # already pruned
    w0 = w * start
    n_prune = 120
    out, keep = sparsegpt_rows(w0, h, n_prune, start, block=block, frozen_last_column=True)
    assert int((~keep).sum()) == n_prune
    assert bool(keep[:, -1].all()) and bool((keep <= start).all())
    assert bool((out[~keep] == 0).all()) and out.dtype == D
    err = output_error(w0, out, x)
    assert err < output_error(w0, w0 * keep, x)
    score = w0.abs().masked_fill(~start, -1.0)
    score[:, -1] = math.inf
    magnitude = torch.ones(o * n, dtype=torch.bool)
    magnitude[torch.sort(score.reshape(-1), stable=True).indices[:n_prune]] = False
    assert err < output_error(w0, w0 * magnitude.reshape(o, n), x)


def test_sparsegpt_rows_without_keep_prunes_exactly_and_keeps_float32():
    x = correlated_inputs(6, 30, seed=60, bias=False)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(61))
    out, keep = sparsegpt_rows(w, (x @ x.T).float(), 17, block=2)
    assert int((~keep).sum()) == 17 and out.dtype == torch.float32
    assert bool((out[~keep] == 0).all())


def test_bad_counts_and_damping_are_one_line_setting_errors():
    x = correlated_inputs(5, 20, seed=70)
    h, w = x @ x.T, torch.randn(3, 5, dtype=D)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 0] = False
    cases = [
        (lambda: sparsegpt_rows(w, h, 13, keep, frozen_last_column=True), "larger than"),
        (lambda: sparsegpt_rows(w, h, -1), ">= 0"),
        (lambda: sparsegpt_rows(w, h, 0, keep), "below the 1"),
        (lambda: sparsegpt_rows(w, h, 2, block=0), "block 0"),
        (lambda: joint_obs_rows(w, h, keep, damping=-0.1), "damping -0.1"),
        (lambda: joint_obs_rows(w, h, keep, damping=math.nan), "damping nan"),
        (lambda: joint_obs_rows(w, h[:4, :4], keep), "does not match"),
        (lambda: kron_matvec(h, h, damping=math.inf), "damping inf"),
    ]
    for call, words in cases:
        with pytest.raises(SettingError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_singular_hessian_needs_damping():
    """Fewer samples than features: H is singular; damping 0 is refused in one line,
    the default damping solves it."""
    x = correlated_inputs(8, 3, seed=80)
    h = x @ x.T
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(81), dtype=D)
    keep = row_masks(4, 8, seed=82)
    with pytest.raises(SettingError, match="not positive definite with damping 0.0"):
        sparsegpt_rows(w, h, 5, damping=0.0)
    with pytest.raises(SettingError, match="larger damping"):
        joint_obs_rows(w, -h, keep, damping=0.0)
    assert bool(torch.isfinite(joint_obs_rows(w, h, keep)).all())
    out, kept = sparsegpt_rows(w, h, 5)
    assert bool(torch.isfinite(out).all()) and int((~kept).sum()) == 5


def test_joint_obs_kron_preconditioned_plain_and_grouped_agree():
    """Jacobi preconditioning (BlockMatvec.diagonal) changes the path, not the answer; a
    (groups, o, i') block is solved per group; an ill-conditioned factor still converges."""
    o, n = 4, 6
    scales = torch.logspace(0, 5, n, dtype=D)
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(90), dtype=D)).Q
    A = q @ torch.diag(scales) @ q.T + torch.diag(scales)
    G = spd(o, 91)
    w = torch.randn(2, o, n, generator=torch.Generator().manual_seed(92), dtype=D)
    keep = torch.stack([block_mask(o, n, 93), block_mask(o, n, 94)])
    mv = kron_matvec(G, A, 1e-3)
    pre = joint_obs_kron(w, mv, keep, tol=1e-13, max_iter=500)
    plain = joint_obs_kron(w, lambda v: mv(v), keep, tol=1e-13, max_iter=500)
    torch.testing.assert_close(pre, plain, atol=1e-8, rtol=0)
    for g in range(2):
        torch.testing.assert_close(
            pre[g], joint_obs_kron(w[g], mv, keep[g], tol=1e-13), atol=1e-8, rtol=0
        )
    lam = 1e-3 * float(G.diagonal().mean() * A.diagonal().mean())
    h = torch.kron(G, A) + lam * torch.eye(o * n, dtype=D)
    delta, _ = dense_obs(h, w[1], ~keep[1])
    torch.testing.assert_close(pre[1], w[1] + delta, atol=1e-7, rtol=0)


def test_joint_obs_kron_refuses_a_curvature_that_is_not_positive_definite():
    w = torch.randn(2, 3, dtype=D)
    keep = torch.tensor([[True, False, True], [True, True, False]])
    with pytest.raises(SettingError, match="not positive definite"):
        joint_obs_kron(w, lambda v: v - 2 * v.sum(), keep)


def test_sparsegpt_rows_result_depends_on_mask_block_not_on_the_lazy_block():
    """Lazy batch updates are exact: with one mask granularity every lazy block size gives
    the same weights and mask; mask_block defaults to block; a finer mask differs."""
    o, n = 6, 12
    x = correlated_inputs(n, 60, seed=100)
    h = x @ x.T
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(101), dtype=D)
    runs = [sparsegpt_rows(w, h, 40, block=b, mask_block=2) for b in (2, 4, 5, 128)]
    for out, keep in runs[1:]:
        assert torch.equal(keep, runs[0][1])
        torch.testing.assert_close(out, runs[0][0], atol=1e-12, rtol=0)
    default = sparsegpt_rows(w, h, 40, block=4)
    same = sparsegpt_rows(w, h, 40, block=4, mask_block=4)
    assert torch.equal(default[1], same[1]) and torch.equal(default[0], same[0])
    coarse = sparsegpt_rows(w, h, 40, block=12)
    assert int((~coarse[1]).sum()) == 40 and not torch.equal(coarse[1], runs[0][1])


def test_obs_rows_fast_is_exact_below_exact_max_and_sequential_above():
    """Rows with min(|S|, |Q|) <= exact_max equal joint_obs_rows; the others equal SparseGPT's
    pass with the mask fixed (n_prune = the mask's count: no new choice) over the columns
    ordered most-removed first."""
    o, n = 12, 10
    x = correlated_inputs(n, 50, seed=11)
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(12), dtype=D)
    keep = row_masks(o, n, seed=13)
    exact = joint_obs_rows(w, x @ x.T, keep, damping=0.02)
    assert torch.equal(obc.obs_rows_fast(w, x @ x.T, keep, 0.02, exact_max=n), exact)
    fast = obc.obs_rows_fast(w, x @ x.T, keep, 0.02, exact_max=2)
    kept = keep.sum(1)
    small = torch.minimum(kept, n - kept) <= 2
    assert 0 < int(small.sum()) < o  # both kinds of rows are present
    torch.testing.assert_close(fast[small], exact[small], atol=1e-12, rtol=0)
    rest = ~small
    order = torch.argsort(keep[rest].sum(0), stable=True)  # most-removed columns first
    h = (x @ x.T)[order][:, order]
    k, n_prune = keep[rest][:, order], int((~keep[rest]).sum())
    seq, _ = sparsegpt_rows(w[rest][:, order], h, n_prune, k, damping=0.02)
    torch.testing.assert_close(fast[rest], seq[:, torch.argsort(order)], atol=1e-12, rtol=0)
    assert bool((fast[~keep] == 0).all())
    # the sequential rows are not the joint minimiser; with correlated inputs SparseGPT's
    # plain column order can end worse than zeroing alone, the ordered pass is better
    h = obc.damped_hessian(x @ x.T, 0.02)

    def err(v):
        d = v[rest] - w[rest]
        return float(torch.einsum("ri,ij,rj->", d, h, d))

    zeroed = torch.where(keep, w, torch.zeros_like(w))
    plain = torch.zeros_like(w)
    plain[rest] = sparsegpt_rows(w[rest], x @ x.T, n_prune, keep[rest], damping=0.02)[0]
    assert err(exact) <= err(fast) < err(zeroed) < err(plain)


def test_joint_obs_rows_bounds_the_gathered_rows_of_the_inverse(monkeypatch):
    """The removed-set form gathers m rows of H^-1 (width i') per row: chunks count them."""
    o, n = 16, 12
    x = correlated_inputs(n, 40, seed=14)
    w = torch.randn(o, n, generator=torch.Generator().manual_seed(15), dtype=D)
    keep = torch.ones(o, n, dtype=torch.bool)
    keep[:, :2] = False  # 2 removed of 12 per row: every row takes the removed-set form
    whole = joint_obs_rows(w, x @ x.T, keep)
    seen = []
    real = obc._solve_removed

    def spy(out, w_, hinv, rows, idx, sizes):
        seen.append((len(rows), idx.shape[1]))
        return real(out, w_, hinv, rows, idx, sizes)

    monkeypatch.setattr(obc, "_solve_removed", spy)
    monkeypatch.setattr(obc, "_SOLVE_ENTRIES", 4 * (2 * 2 + 2 * n))  # 4 rows per chunk
    torch.testing.assert_close(joint_obs_rows(w, x @ x.T, keep), whole, atol=1e-12, rtol=0)
    assert seen == [(4, 2)] * 4
