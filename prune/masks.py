"""Masks: pure functions from scores to keep-masks (True = keep), plus applying them.

Every function here takes and returns dicts keyed by parameter name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunekit.errors import ModelError, SettingError, choice_error
from prunekit.types import Masks, Scores

SCOPES = ("global", "layer")


def full_masks(params: dict[str, Tensor]) -> Masks:
    """All-True masks shaped like ``params`` (nothing pruned yet)."""
    return {
        name: torch.ones(p.shape, dtype=torch.bool, device=p.device) for name, p in params.items()
    }


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as float if it lies in [0, 1); raise SettingError otherwise."""
    value = float(sparsity)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise SettingError(f"sparsity {sparsity!r} is outside [0, 1); use e.g. 0.9 for 90%")
    return value


def _check_finite(scores: Scores) -> None:
    for name, s in scores.items():
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            raise ModelError(
                f"scores of {name!r} hold {bad} non-finite values; scores must be finite "
                "(check the model's weights and the data for NaN/inf)"
            )


def _prune_lowest(score: Tensor, keep: Tensor, n_pruned_target: int) -> Tensor:
    """Keep-mask over a flat vector with exactly ``n_pruned_target`` False (monotone).

    Already pruned positions stay pruned; among survivors the lowest scores go first and
    ties are broken by position (stable sort), so the result is deterministic.
    """
    n_pruned_now = int((~keep).sum())
    n_new = max(n_pruned_target - n_pruned_now, 0)
    if n_new == 0:
        return keep.clone()
    ranked = torch.where(
        keep, score.double(), torch.full_like(score, -torch.inf, dtype=torch.float64)
    )
    order = torch.sort(ranked, stable=True).indices
    new_keep = keep.clone()
    new_keep[order[: n_pruned_now + n_new]] = False
    return new_keep


def next_masks(scores: Scores, masks: Masks, sparsity: float, scope: str = "global") -> Masks:
    """Masks with exactly round(sparsity * N) pruned weights, never regrowing.

    scores: float tensors (higher = keep) keyed like ``masks``; masks: current bool masks
    (True = keep); sparsity: target fraction in [0, 1) counted over these tensors;
    scope: 'global' ranks all tensors together, 'layer' prunes each tensor to
    round(sparsity * numel). If the target is below what is already pruned, the current
    masks are kept (masks are monotone).
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise choice_error("scope", scope, SCOPES)
    if set(scores) != set(masks):
        raise SettingError(
            f"scores and masks name different tensors: {sorted(set(scores) ^ set(masks))}"
        )
    _check_finite(scores)
    if scope == "layer":
        return {
            name: _prune_lowest(
                scores[name].flatten(), masks[name].flatten(), round(sparsity * masks[name].numel())
            ).view_as(masks[name])
            for name in masks
        }
    names = list(masks)
    flat_scores = torch.cat([scores[n].detach().flatten().cpu() for n in names])
    flat_keep = torch.cat([masks[n].flatten().cpu() for n in names])
    keep = _prune_lowest(flat_scores, flat_keep, round(sparsity * flat_keep.numel()))
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = keep[start : start + size].view_as(masks[n]).to(masks[n].device)
        start += size
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights of ``model`` in place (w <- w * m)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def masks_from_weights(params: dict[str, Tensor]) -> Masks:
    """Masks read off the zeros of the weights (True where the weight is non-zero)."""
    return {name: p.detach() != 0 for name, p in params.items()}


def sparsity_of(masks: Masks) -> tuple[float, dict[str, float]]:
    """(global fraction pruned, per-tensor fraction pruned) of ``masks``."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    per_layer = {n: float((~m).sum()) / m.numel() for n, m in masks.items()}
    return (pruned / total if total else 0.0), per_layer
