"""Layer-wise one-shot pruning (OBC / SparseGPT, methods.md 9.2): sequential, no task loss.

Each factorable target (``kfac.split_targets``: Linear, Conv1d/Conv2d with zero or 'valid'
padding, grouped convs per group) is pruned against its own inputs: the calibration batches
are run through the model with the earlier targets ALREADY pruned and updated, the layer's
input Hessian ``H = sum over examples and positions of a a^T`` (a: the input row with a
ones entry for the bias, ``kfac.activation_rows``; conv patches are positions) is
accumulated in float64, and the layer's block ``[W | b]`` is refitted so that it reproduces
the dense layer's outputs on those inputs (``criteria.obc``): the bias is updated, never
pruned. Targets run in forward order (the first call of each module in one hooked forward).

Targets that cannot be factored (recurrent, embeddings, custom, tied weights) and factorable
ones that no batch reached are pruned by magnitude within their count, with no update,
before the others (so later layers see them pruned), and listed in ``fallback``.

No trace: the forward passes run in eval mode (``capture.scoring_mode``) without autograd,
hooks only through ``capture.capture``; train/eval flags, hooks and requires_grad are
restored, no random numbers are drawn. The weights (and biases) of the targets change in
place: that is the point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.criteria.capture import capture, scoring_mode
from prunekit.criteria.kfac import Layer, activation_rows, block_to_params, split_targets
from prunekit.criteria.obc import (
    check_count,
    check_damping,
    joint_obs_rows,
    obs_saliency,
    prune_lowest,
    sparsegpt_rows,
)
from prunekit.errors import DataError, SettingError, choice_error, int_setting
from prunekit.types import Batch, Target

SOLVERS = ("sparsegpt", "exact")

Forward = Callable[[nn.Module, Batch], Any]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LayerwiseResult:
    """What ``prune_layerwise`` did.

    masks: name -> bool keep-mask (True = keep) for every mask given plus every counted
    target; reconstruction: factorable target name -> relative output error
    ``||(W - W^)X||^2 / ||W X||^2`` of its block (bias included) on the calibration inputs
    it was pruned against (0.0 when the dense outputs are all zero); fallback: targets
    pruned by magnitude without update; solver: 'sparsegpt' or 'exact'.
    """

    masks: dict[str, Tensor]
    reconstruction: dict[str, float]
    fallback: tuple[str, ...]
    solver: str


def _check_counts(
    targets: dict[str, Target], counts: dict[str, int], masks: dict[str, Tensor]
) -> dict[str, int]:
    """Counts as ints, checked against each target's size and its current pruned count."""
    out = {}
    for name, count in counts.items():
        if name not in targets:
            raise SettingError(f"count for {name!r}, which is not a target; valid: targets")
        what = f"pruned count for {name!r}"
        n = int_setting(count, what, 0)
        keep = masks.get(name)
        pruned = 0 if keep is None else int((~keep.bool()).sum())
        check_count(n, pruned, targets[name].numel - pruned, what)
        out[name] = n
    return out


def _forward_order(model: nn.Module, forward: Forward, modules: list[str], batch: Batch):
    """Module names in the order of their first call in one forward of ``batch``."""
    seen: list[str] = []

    class _Calls(list):  # a Recorder input list that notes which module ran, keeps nothing
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def append(self, _item) -> None:
            seen.append(self.name)

    with scoring_mode(model), torch.no_grad(), capture(model, modules) as rec:
        for m in modules:
            rec.inputs[m] = _Calls(m)
        forward(model, batch)
        rec.clear()
    return list(dict.fromkeys(seen))


def _input_hessian(
    model: nn.Module, forward: Forward, layer: Layer, batches: Sequence[Batch]
) -> Tensor | None:
    """sum over batches, examples, positions and calls of a a^T: (groups, i', i') float64.

    None when no batch ran through the layer's module.
    """
    module = dict(model.named_modules())[layer.module]
    total = None
    with scoring_mode(model), torch.no_grad(), capture(model, [layer.module]) as rec:
        for batch in batches:
            rec.clear()
            forward(model, batch)
            for x in rec.inputs[layer.module]:
                rows = activation_rows(module, layer, x).double()  # (N, g, L, i')
                flat = rows.transpose(0, 1).reshape(layer.groups, -1, rows.shape[-1])
                part = flat.transpose(1, 2) @ flat
                total = part if total is None else total + part
        rec.clear()
    return total


def _block(layer: Layer, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(groups, o, i') float64 block [W | b] of a layer (as ``kfac.params_to_block``)."""
    w = weight.detach().double().reshape(layer.groups, layer.rows, -1)
    if layer.bias is None:
        return w
    return torch.cat([w, bias.detach().double().reshape(layer.groups, layer.rows, 1)], dim=-1)


def _keep_block(layer: Layer, keep: Tensor) -> Tensor:
    """(groups, o, i') bool: the weight's keep-mask with the bias column True."""
    k = keep.bool().reshape(layer.groups, layer.rows, -1)
    if layer.bias is None:
        return k
    ones = torch.ones(*k.shape[:-1], 1, dtype=torch.bool, device=k.device)
    return torch.cat([k, ones], dim=-1)


def _group_counts(block, hess, keep, eligible, count, damping) -> tuple[Tensor, list[int]]:
    """OBS-saliency mask over all groups with ``count`` pruned, and its count per group."""
    score = torch.stack([obs_saliency(block[g], hess[g], damping) for g in range(len(block))])
    new_keep = prune_lowest(score, keep, eligible, count)
    return new_keep, [int((~k).sum()) for k in new_keep]


def _solve_layer(layer, block, hess, keep, count, solver, size, damping, mask_block):
    """(new block (g, o, i') float64, new keep (g, o, i')) for one factorable layer."""
    eligible = keep.clone()
    if layer.bias is not None:
        eligible[..., -1] = False
    if solver == "sparsegpt" and layer.groups == 1:
        new_keep, per_group = keep, [count]  # sparsegpt_rows chooses its own mask
    else:
        new_keep, per_group = _group_counts(block, hess, keep, eligible, count, damping)
    if solver == "exact":
        out = [joint_obs_rows(block[g], hess[g], new_keep[g], damping) for g in range(len(block))]
        return torch.stack(out), new_keep
    out, masks = [], []
    for g in range(layer.groups):
        w, k = sparsegpt_rows(
            block[g],
            hess[g],
            per_group[g],
            keep[g],
            block=size,
            damping=damping,
            frozen_last_column=layer.bias is not None,
            mask_block=mask_block,
        )
        out.append(w)
        masks.append(k)
    return torch.stack(out), torch.stack(masks)


def _relative_error(old: Tensor, new: Tensor, hess: Tensor) -> float:
    """sum_g tr(dW H dW^T) / sum_g tr(W H W^T) with the undamped H; 0.0 when 0/0."""
    diff = old - new
    num = float((diff @ hess * diff).sum())
    den = float((old @ hess * old).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _magnitude(param: Tensor, keep: Tensor, count: int) -> Tensor:
    """Keep-mask with ``count`` pruned by |w| among the kept; zeroes the pruned in place."""
    new_keep = prune_lowest(param.detach().abs(), keep, keep, count)
    param.mul_(new_keep.to(param.dtype))
    return new_keep


def _settings(solver: str, block: int, damping: float) -> tuple[int, float]:
    if solver not in SOLVERS:
        raise choice_error("layer-wise solver", solver, SOLVERS)
    return int_setting(block, "block", 1), check_damping(damping)


def prune_layerwise(
    model: nn.Module,
    forward: Forward,
    targets: dict[str, Target],
    batches: Sequence[Batch],
    counts: dict[str, int],
    masks: dict[str, Tensor],
    *,
    solver: str = "sparsegpt",
    block: int = 128,
    damping: float = 0.01,
    mask_block: int | None = None,
    progress: Progress | None = None,
) -> LayerwiseResult:
    """Sequential layer-wise one-shot pruning of ``model``'s targets (module docstring).

    forward: ``forward(model, batch)`` runs the model (the Task's forward); targets: name ->
    Target (``prune.targets.find_targets``); batches: calibration batches, iterated once per
    factorable target; counts: name -> total pruned entries wanted in that target after
    this call (>= its pruned count in ``masks``; targets without a count are left alone);
    masks: current keep-masks (True = keep; a target without one counts as dense).
    solver: 'sparsegpt' (``obc.sparsegpt_rows``, lazy-update column blocks of ``block``,
    mask chosen every ``mask_block`` columns, default ``block``) or 'exact'
    (mask by OBS saliency ``w^2/[H^-1]_qq`` ranked within the layer, then
    ``obc.joint_obs_rows``); damping: relative, ``damping * mean(diag H)``. progress:
    called as ``progress(done, total, name)`` after each target. Weights and biases are
    updated in place (pruned entries exactly 0). SettingError for a bad solver, block,
    damping or count, or a layer Hessian that is not positive definite after damping.
    """
    size, damping = _settings(solver, block, damping)
    if mask_block is not None:
        mask_block = int_setting(mask_block, "mask_block", 1)
    batches = list(batches)
    if not batches:
        raise DataError("no calibration batches for layer-wise pruning (the data is empty)")
    counts = _check_counts(targets, counts, masks)
    params = dict(model.named_parameters())
    new_masks = {n: m.bool().clone() for n, m in masks.items()}
    for n in counts:
        if n not in new_masks:
            new_masks[n] = torch.ones(targets[n].shape, dtype=torch.bool, device=params[n].device)
    layers, rest = split_targets(model, {n: targets[n] for n in counts})
    order = _forward_order(model, forward, [ly.module for ly in layers.values()], batches[0])
    by_module = {ly.module: t for t, ly in layers.items()}
    ordered = [by_module[m] for m in order]
    fallback = list(rest) + [t for t in layers if t not in ordered]
    reconstruction: dict[str, float] = {}
    step = _Step(len(counts), progress)
    with torch.no_grad():
        for name in list(fallback):
            new_masks[name] = _magnitude(params[name], new_masks[name], counts[name])
            step(name)
        for name in ordered:
            settings = (solver, size, damping, mask_block)
            error = _prune_one(
                model, forward, layers[name], batches, params, new_masks, counts[name], settings
            )
            if error is None:  # the first batch reached it, the others did not: never mind
                new_masks[name] = _magnitude(params[name], new_masks[name], counts[name])
                fallback.append(name)
            else:
                reconstruction[name] = error
            step(name)
    return LayerwiseResult(new_masks, reconstruction, tuple(fallback), solver)


class _Step:
    """Counts finished targets and reports them to ``progress(done, total, name)``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)


def _prune_one(model, forward, layer, batches, params, masks, count, settings):
    """Prune one factorable target in place against its current inputs; its relative error
    (None, nothing changed, when no batch ran through its module)."""
    hess = _input_hessian(model, forward, layer, batches)
    if hess is None:
        return None
    weight = params[layer.target]
    bias = params[layer.bias] if layer.bias is not None else None
    old = _block(layer, weight, bias)
    keep = _keep_block(layer, masks[layer.target])
    try:
        new, new_keep = _solve_layer(layer, old, hess, keep, count, *settings)
    except SettingError as exc:
        raise SettingError(f"layer {layer.target!r}: {exc}") from None
    for pname, value in block_to_params(layer, new).items():
        params[pname].copy_(value.to(params[pname].dtype))
    masks[layer.target] = block_to_params(layer, new_keep)[layer.target].bool()
    return _relative_error(old, new, hess)
