"""Optimal Brain Surgeon on a curvature value: saliency and the compensating weight update.

With H = F + lam I (F: the curvature's Fisher block of a layer, lam its damping), removing
weight q alone costs (to second order, at a minimum) rho_q = theta_q^2 / (2 [H^-1]_qq), and
the best change of the other weights of the block is

    delta = -theta_q H^-1 e_q / [H^-1]_qq.

In the Kronecker eigenbasis of KFAC/EKFAC, H^-1 V = U_G [(U_G^T V U_A) / (S + lam)] U_A^T,
so the update of a whole layer is two small matmuls on each side; no dense block is built.

Several weights at once. The exact joint update, -H^-1 E_Q (E_Q^T H^-1 E_Q)^-1 theta_Q, needs
a |Q| x |Q| solve. ``obs_update`` replaces (E_Q^T H^-1 E_Q) by its diagonal, i.e. it sums the
single-weight updates, V = sum_q (theta_q / [H^-1]_qq) E_q, ignoring interactions between
the removed weights, and then sets the removed (and previously pruned) weights to exactly
zero. This is accurate when each step removes a small fraction of the weights (the
locality argument of methods.md §1.5), which is why the pipeline applies it within a step
and re-estimates the curvature before the next one.

Row form. ``rows_update`` keeps only the input factor A = E[a a^T] (KFAC's A; EKFAC's
U_A diag(lambda_A) U_A^T), i.e. the layer-reconstruction objective of OBC/SparseGPT
sum_r (w_r - w'_r)^T A (w_r - w'_r) (KFAC with the output factor G replaced by its
diagonal, which scales each row's quadratic and so leaves its minimiser alone). Rows are
independent: each gets its joint update by one Cholesky solve where that is cheap and
SparseGPT's sequential pass elsewhere (``obc.obs_rows_fast``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.criteria.diag import damping_value
from prunekit.criteria.kfac import block_to_params, kfe_diagonal, params_to_block
from prunekit.criteria.obc import ekfac_matvec, joint_obs_kron, obs_rows_fast
from prunekit.types import Masks


def obs_saliency(theta: Tensor, inverse_diagonal: Tensor) -> Tensor:
    """rho = theta^2 / (2 [H^-1]_qq), float32, in loss units; higher = keep.

    theta and inverse_diagonal are shaped like the target; inverse_diagonal > 0.
    """
    theta = theta.detach().double()
    return (theta.pow(2) / (2.0 * inverse_diagonal.double())).float()


def _layer_update(layer, parts, theta: Tensor, removed: Tensor, damping, absolute):
    """Summed single-weight OBS updates of one factored layer as {weight, bias} deltas."""
    u_g, scale, u_a = parts
    h = 1.0 / (scale + damping_value(scale, damping, absolute))  # eigenvalues of H^-1
    h_diag = kfe_diagonal(u_g, h, u_a)  # [H^-1]_qq for every entry of the block
    w = params_to_block(layer, theta.detach().to(scale.dtype), None, fill=0.0)
    gone = params_to_block(layer, removed.to(scale.dtype), None, fill=0.0)
    v = w * gone / h_diag
    delta = -(u_g @ ((u_g.transpose(-1, -2) @ v @ u_a) * h) @ u_a.transpose(-1, -2))
    return block_to_params(layer, delta)


def obs_update(
    curvature,
    params: dict[str, Tensor],
    masks: Masks,
    *,
    damping: float = 1e-3,
    absolute: float = 0.0,
) -> dict[str, Tensor]:
    """Parameter changes that prune ``~masks`` and compensate with the surviving weights.

    curvature: an ``EKFAC`` (or ``KFAC``; ``Diag`` targets get no compensation). params:
    name -> current tensor (at least every target in ``masks``). masks: the keep-masks
    AFTER this step (True = keep). damping/absolute: lam = damping * mean(S) + absolute,
    as in ``inverse_diagonal``. Returns name -> delta (same shape and dtype as the
    parameter) for the masked targets and the biases of factored layers; add them:
    ``p += delta``. Removed weights end exactly at zero; see the module docstring for
    the approximation used when a layer loses several weights at once.
    """

    def layer_update(name, layer, parts, keep):
        return _layer_update(layer, parts, params[name], ~keep, damping, absolute)

    return _per_layer(curvature, params, masks, layer_update)


def _per_layer(curvature, params: dict[str, Tensor], masks: Masks, layer_update, parts_of=None):
    """Deltas from ``layer_update(name, layer, parts_of(name), keep) -> {param: delta}`` for
    every factored target that loses weights (``parts_of`` defaults to the kfe parts);
    removed weights end exactly at zero."""
    deltas: dict[str, Tensor] = {}
    layers = getattr(curvature, "layers", {})
    if parts_of is None:
        parts_of = curvature.kfe().get if layers else None
    for name, keep in masks.items():
        theta = params[name]
        keep = keep.to(torch.bool)
        if name in layers and not bool(keep.all()):
            parts = layer_update(name, layers[name], parts_of(name), keep)
            for pname, d in parts.items():
                deltas[pname] = d.to(params[pname].dtype)
        base = deltas.get(name, torch.zeros_like(theta))
        # x + (-x) == 0 exactly, so removed weights end at exactly zero.
        deltas[name] = torch.where(~keep, -theta.detach(), base)
    return deltas


def _joint_layer(layer, parts, params: dict[str, Tensor], keep: Tensor, damping: float, tol):
    """Deltas {weight, bias} of one factored layer under the exact joint OBS update."""
    u_g, scale, u_a = parts
    weight = params[layer.target].detach().to(scale.dtype)
    bias = params[layer.bias].detach().to(scale.dtype) if layer.bias else None
    block = params_to_block(layer, weight, bias)
    kept = params_to_block(layer, keep.to(scale.dtype), None, fill=1.0).bool()
    matvec = ekfac_matvec(u_g, scale, u_a, damping)
    new = joint_obs_kron(block, matvec, kept, tol=tol, max_iter=200)
    return block_to_params(layer, new - block)


def joint_update(
    curvature,
    params: dict[str, Tensor],
    masks: Masks,
    *,
    damping: float | dict = 1e-2,
    tol: float = 1e-3,
) -> dict[str, Tensor]:
    """Parameter changes that prune ``~masks`` with the exact joint OBS update per layer.

    Per factored target, with H = the curvature's block (EKFAC: U (S + lam) U^T, lam =
    damping * mean(S)) and Q every removed entry (this step's and earlier ones'), the
    surviving entries and the bias get delta_S = H_SS^-1 H_SQ theta_Q (methods.md 9.1,
    ``obc.joint_obs_kron``, conjugate gradients on the kept coordinates; no dense block
    is built). damping: one value, or target name -> value (a per-layer choice); tol: CG's
    relative residual (1e-3: below the curvature estimate's own error, 5-10x faster than
    1e-6 on the MNIST MLP, 0.9 point lower one-shot accuracy at 95% there). Same
    contract as ``obs_update``: name -> delta (parameter shape and dtype), removed weights
    end exactly at zero; targets without factors (``Diag``) get no compensation.
    """

    def layer_update(name, layer, parts, keep):
        lam = damping[name] if isinstance(damping, dict) else damping
        return _joint_layer(layer, parts, params, keep, lam, tol)

    return _per_layer(curvature, params, masks, layer_update)


def input_factor(curvature, target: str) -> Tensor:
    """The input factor A (groups, i', i') of a factored target: KFAC's ``A``, or EKFAC's
    ``U_A diag(lambda_A) U_A^T`` (equal to A up to the eigensolver's rounding)."""
    if hasattr(curvature, "A"):
        return curvature.A[target]
    basis = curvature.basis
    u_a, lam = basis.u_a[target], basis.lambda_a[target]
    return (u_a * lam[..., None, :]) @ u_a.transpose(-1, -2)


def _rows_layer(layer, a: Tensor, params, keep: Tensor, damping: float, exact_max: int):
    """Deltas {weight, bias} of one factored layer under the row-form update (float64)."""
    bias = params[layer.bias].detach() if layer.bias else None
    block = params_to_block(layer, params[layer.target].detach().double(), bias)
    kept = params_to_block(layer, keep.double(), None, fill=1.0).bool()
    new = torch.stack(
        [obs_rows_fast(block[g], a[g], kept[g], damping, exact_max) for g in range(layer.groups)]
    )
    return block_to_params(layer, new - block)


def rows_update(
    curvature,
    params: dict[str, Tensor],
    masks: Masks,
    *,
    damping: float | dict = 1e-2,
    exact_max: int = 64,
) -> dict[str, Tensor]:
    """Parameter changes that prune ``~masks`` with the exact joint update per output row
    against the layer's input factor A (module docstring, "Row form").

    Per factored target and row r, with Q the row's removed entries (this step's and
    earlier ones') and S its kept ones, the bias (last block column) always kept:
    delta_S = (A + lam I)_SS^-1 (A + lam I)_SQ theta_Q, lam = damping * mean(diag A),
    exactly for rows with min(|S|, |Q|) <= ``exact_max``, by SparseGPT's sequential column
    pass with the mask fixed for the others (``obc.obs_rows_fast``: a row of 785 inputs at
    half sparsity costs one 785 x 785 inverse shared by the layer instead of a 392^3
    solve). damping: one value or target name -> value. Same contract as ``obs_update``: name ->
    delta (parameter shape and dtype), removed weights end exactly at zero; targets
    without factors get no compensation.
    """

    def layer_update(name, layer, a, keep):
        lam = damping[name] if isinstance(damping, dict) else damping
        return _rows_layer(layer, a.double(), params, keep, lam, exact_max)

    return _per_layer(curvature, params, masks, layer_update, lambda n: input_factor(curvature, n))
