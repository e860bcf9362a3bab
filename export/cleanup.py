"""Structural cleanup of a pruned model before export (works on a copy, in place on it).

1. ``bake_masks``: w <- w * m, so masks live only in the zeros (no Mul-by-mask in graphs).
2. ``fold_batchnorm``: Conv/Linear directly followed by an eval-mode BatchNorm with running
   statistics inside an nn.Sequential: scale the weight rows, shift the bias, replace the
   BatchNorm by nn.Identity.
3. ``remove_dead_units``: inside nn.Sequential chains ``A -> elementwise/pooling/Flatten ->
   B`` (A, B Linear or Conv with groups=1) drop hidden unit j of A when
   - its outgoing weights (column j of B) are all zero: it cannot influence anything; or
   - its incoming weights (row j of A) are all zero: it outputs the constant c = f(b_j).
     c == 0 -> drop; c != 0 and B is Linear (or an unpadded Conv) -> fold c * B[:, j] into
     B's bias and drop; otherwise (padding or pooling sees the constant differently at
     borders) skip it and record why.
Every change is recorded as a plain sentence for the receipt.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
    nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
)  # fmt: skip
# per-channel ops: a dropped channel stays dropped, but a constant channel may not stay constant
CHANNELWISE = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def bake_masks(net: nn.Module, masks: dict[str, Tensor]) -> None:
    """Multiply each masked parameter by its mask (True = keep), in place."""
    params = dict(net.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def _sequentials(net: nn.Module) -> list[tuple[str, nn.Sequential]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Sequential)]


def _qual(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> tuple[list[str], list[str]]:
    """Fold BatchNorm into the preceding Conv/Linear where legal; (actions, skipped)."""
    actions, skipped = [], []
    for prefix, seq in _sequentials(net):
        keys = list(seq._modules)
        for a_key, bn_key in zip(keys, keys[1:], strict=False):
            layer, bn = seq._modules[a_key], seq._modules[bn_key]
            if not isinstance(bn, BATCHNORMS) or not isinstance(layer, LAYERS):
                continue
            where = _qual(prefix, bn_key)
            if bn.running_mean is None or bn.running_var is None:
                skipped.append(f"BatchNorm {where} kept: no running statistics (uses batch stats)")
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            view = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.view(view).to(layer.weight.dtype))
            bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
            layer.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
            seq._modules[bn_key] = nn.Identity()
            actions.append(f"folded BatchNorm {where} into {_qual(prefix, a_key)}")
    return actions, skipped


def _chains(seq: nn.Sequential) -> list[tuple[str, list[nn.Module], str, bool]]:
    """(A key, middle modules, B key, has Flatten) for each removable-pair in ``seq``."""
    keys, out = list(seq._modules), []
    for i, key in enumerate(keys):
        if not isinstance(seq._modules[key], LAYERS):
            continue
        mids, flat = [], False
        for nxt in keys[i + 1 :]:
            mod = seq._modules[nxt]
            if isinstance(mod, LAYERS):
                out.append((key, mids, nxt, flat))
                break
            if isinstance(mod, nn.Flatten) and not flat:
                flat = True
            elif not isinstance(mod, ELEMENTWISE + CHANNELWISE):
                break
            mids.append(mod)
    return out


def _unit_cols(a: nn.Module, b: nn.Module, flat: bool) -> list[slice] | None:
    """For each unit of A, the slice of B's input dim it feeds; None if the pair is unfit."""
    n = a.weight.shape[0]
    if isinstance(a, nn.Linear) != isinstance(b, nn.Linear) and not flat:
        return None
    if getattr(a, "groups", 1) != 1 or getattr(b, "groups", 1) != 1:
        return None
    if flat:
        if isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or b.in_features % n:
            return None
        block = b.in_features // n
        return [slice(j * block, (j + 1) * block) for j in range(n)]
    if b.weight.shape[1] != n:
        return None
    return [slice(j, j + 1) for j in range(n)]


def _constant_out(a: nn.Module, mids: list[nn.Module]) -> Tensor:
    """f(b_j) per unit: what an incoming-dead unit outputs after the elementwise modules."""
    value = a.bias.detach().clone() if a.bias is not None else torch.zeros(a.weight.shape[0])
    for mod in mids:
        if isinstance(mod, ELEMENTWISE):
            value = mod(value.view(1, -1)).view(-1)
    return value


def _fold_target(b: nn.Module, mids: list[nn.Module]) -> str | None:
    """Why a non-zero constant unit cannot be folded into B's bias, or None if it can."""
    if any(isinstance(m, CHANNELWISE) for m in mids):
        return "pooling between the layers"
    if not isinstance(b, nn.Linear):
        pad = b.padding if isinstance(b.padding, tuple) else (b.padding,)
        if any(p != 0 and p != "valid" for p in pad):
            return f"{type(b).__name__} is zero-padded (borders see 0, not the constant)"
    return None


@torch.no_grad()
def _prune_pair(a: nn.Module, b: nn.Module, mids: list, cols: list[slice]) -> tuple:
    """Decide which units of A go, without changing anything.

    Returns (keep, counts, bias_add): bias_add [B out] is what constant units contribute
    to B's bias once they are dropped (zeros if none).
    """
    w_a, w_b = a.weight.flatten(1), b.weight.transpose(0, 1).flatten(1)  # [units, ...]
    consts = _constant_out(a, mids)
    why_not = _fold_target(b, mids)
    keep, counts = [], {"outgoing": 0, "incoming": 0, "folded": 0, "skipped": 0}
    bias_add = torch.zeros(b.weight.shape[0], dtype=b.weight.dtype)
    for j, cs in enumerate(cols):
        if not w_b[cs].any():
            counts["outgoing"] += 1
        elif w_a[j].any():
            keep.append(j)
        elif consts[j] == 0:
            counts["incoming"] += 1
        elif why_not is None:
            bias_add += b.weight[:, cs].sum(dim=tuple(range(1, b.weight.dim()))) * consts[j]
            counts["folded"] += 1
        else:
            keep.append(j)
            counts["skipped"] += 1
    counts["why_not"] = why_not
    return keep, counts, bias_add


@torch.no_grad()
def _add_bias(b: nn.Module, bias_add: Tensor) -> None:
    """b.bias += bias_add, creating the bias if the layer has none."""
    if b.bias is None:
        b.bias = nn.Parameter(torch.zeros_like(bias_add))
    b.bias.add_(bias_add)


@torch.no_grad()
def _shrink(a: nn.Module, b: nn.Module, keep: list[int], cols: list[slice]) -> Tensor:
    """Slice A's rows and B's input columns to ``keep``; returns B's kept column index."""
    idx = torch.tensor(keep, dtype=torch.long)
    col_idx = torch.cat([torch.arange(cols[j].start, cols[j].stop) for j in keep])
    a.weight = nn.Parameter(a.weight[idx].clone())
    if a.bias is not None:
        a.bias = nn.Parameter(a.bias[idx].clone())
    b.weight = nn.Parameter(b.weight[:, col_idx].clone())
    for mod, attr, val in (
        (a, "out_features", len(keep)),
        (a, "out_channels", len(keep)),
        (b, "in_features", len(col_idx)),
        (b, "in_channels", len(keep)),
    ):
        if hasattr(mod, attr):
            setattr(mod, attr, val)
    return col_idx


def _slice_masks(masks: dict, names: tuple[str, str], keep: list[int], col_idx: Tensor) -> None:
    a_name, b_name = names
    if a_name in masks:
        masks[a_name] = masks[a_name][torch.tensor(keep, dtype=torch.long)]
    if b_name in masks:
        masks[b_name] = masks[b_name][:, col_idx]


def _describe(where: str, n: int, keep: list[int], counts: dict) -> tuple[str | None, str | None]:
    removed = n - len(keep)
    action = skip = None
    if removed:
        action = (
            f"removed {removed} of {n} units of {where} ({counts['outgoing']} without outgoing "
            f"weights, {counts['incoming'] + counts['folded']} without incoming weights, "
            f"{counts['folded']} of them folded into the next bias)"
        )
    if counts["skipped"]:
        skip = (
            f"kept {counts['skipped']} units of {where} whose incoming weights are all pruned: "
            f"they output a non-zero constant and {counts['why_not']}"
        )
    return action, skip


def remove_dead_units(net: nn.Module, masks: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Drop dead hidden units of nn.Sequential chains in place; (actions, skipped).

    ``masks`` (parameter name -> bool, True = keep) is sliced alongside the weights. Repeats
    until nothing changes, since removing a unit can leave a neighbour dead.
    """
    actions, skipped, changed = [], [], True
    while changed:
        changed = False
        for prefix, seq in _sequentials(net):
            for a_key, mids, b_key, flat in _chains(seq):
                a, b = seq._modules[a_key], seq._modules[b_key]
                cols = _unit_cols(a, b, flat)
                where = _qual(prefix, a_key)
                if cols is None:
                    continue
                keep, counts, bias_add = _prune_pair(a, b, mids, cols)
                if not keep:
                    skipped.append(f"every unit of {where} is dead; layer kept (output constant)")
                    continue
                action, skip = _describe(where, len(cols), keep, counts)
                if skip and skip not in skipped:
                    skipped.append(skip)
                if action is None:
                    continue
                if counts["folded"]:
                    _add_bias(b, bias_add)
                col_idx = _shrink(a, b, keep, cols)
                _slice_masks(
                    masks, (f"{where}.weight", f"{_qual(prefix, b_key)}.weight"), keep, col_idx
                )
                actions.append(action)
                changed = True
    return actions, skipped
