"""Physically smaller models: delete the removed units' rows, columns and entries.

``shrink_model(model, groups, keep)`` returns a new module (a deep copy; ``model`` is left
as it was) whose Linear, Conv, BatchNorm, nn.LSTM/nn.GRU layers and attention heads have
the smaller shapes, and whose outputs equal those of the zeroed model (every member entry
of every removed unit set to 0, the keep-masks of ``unit_param_masks``) up to float
rounding. ``check_keep`` refuses a choice that would leave a layer without units.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from prunekit.errors import SettingError
from prunekit.prune.groups import UnitGroup, unit_param_masks

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_keep(groups: list[UnitGroup], keep: dict[str, Tensor]) -> None:
    """SettingError (one line) unless ``keep`` keeps at least one unit of every group.

    keep: group name -> bool (size,) (True = the unit stays). Removing every unit of a
    group would leave its layer with no rows (a zero-width Linear/Conv/head)."""
    for g in groups:
        if g.name not in keep:
            raise SettingError(f"no unit keep-mask for group {g.name!r}")
        kept = keep[g.name]
        if tuple(kept.shape) != (g.size,):
            raise SettingError(
                f"unit keep-mask of {g.name!r} has shape {tuple(kept.shape)}, expected ({g.size},)"
            )
        if not bool(kept.any()):
            raise SettingError(
                f"removing all {g.size} units of {g.name!r} would empty layer {g.name}; "
                "keep at least one unit per group (lower the sparsity)"
            )


def keep_from_zeros(model: nn.Module, groups: list[UnitGroup]) -> dict[str, Tensor]:
    """Kept units read off the weights: a unit goes (False) when every entry its readers
    ('in' members) hold is exactly 0 (a group with no reader: every 'out' entry).

    Nothing reads such a unit, so deleting it is exact; this is how a checkpoint saved with
    full shapes and zeroed units (a units-pruned run) is shrunk later, e.g. at export. The
    lowest-numbered unit of a group with no live unit stays, so no layer is emptied.
    Returns group name -> bool (size,) (True = keep).
    """
    params = dict(model.named_parameters())
    keep = {}
    for g in groups:
        readers = [m for m in g.members if m.role == "in"] or list(g.members)
        alive = torch.zeros(g.size, dtype=torch.bool)
        for unit in range(g.size):
            alive[unit] = any(
                bool(params[m.param].detach().index_select(m.dim, m.index(unit).to(
                    params[m.param].device)).ne(0).any())
                for m in readers
            )  # fmt: skip
        if not alive.any():
            alive[0] = True
        keep[g.name] = alive
    return keep


def shrink_model(model: nn.Module, groups: list[UnitGroup], keep: dict[str, Tensor]) -> nn.Module:
    """A new, smaller copy of ``model`` without the removed units of ``groups``.

    keep: group name -> bool (size,), True = the unit stays. The copy first zeroes every
    member entry of the removed units, then deletes the entries along each member's dim:
    Linear/Conv rows (out) and columns (in) with in/out sizes updated, BatchNorm entries
    with their running statistics, nn.LSTM/nn.GRU rebuilt with the smaller input/hidden
    size, and a 'head' group's module gets ``heads`` = kept heads. The stacked layers of one
    nn.LSTM/GRU share one hidden size: a layer that keeps fewer units than another keeps
    some removed (all-zero, so exactly inert) units as padding. Output equals the zeroed
    model's to float rounding (eval mode). SettingError: an emptied group (``check_keep``)
    or a member in a module this cannot shrink.
    """
    check_keep(groups, keep)
    new = copy.deepcopy(model)
    params = dict(new.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    masks = unit_param_masks(groups, keep, shapes)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device))
    kept = _kept_indices(groups, _pad_recurrent(new, groups, keep), shapes)
    by_module: dict[str, dict[tuple[str, int], Tensor]] = {}
    for (param, dim), index in kept.items():
        owner, _, local = param.rpartition(".")
        by_module.setdefault(owner, {})[(local, dim)] = index
    modules = dict(new.named_modules())
    for owner, index in by_module.items():
        _shrink_module(new, owner, modules[owner], index)
    for g in groups:
        if g.kind == "head":
            _set_heads(new, g, int(keep[g.name].sum()))
    return new


def _kept_indices(
    groups: list[UnitGroup], keep: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]
) -> dict[tuple[str, int], Tensor]:
    """(param, dim) -> ascending int64 positions that stay (a position goes if any group
    removes it)."""
    gone: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        removed = torch.nonzero(~keep[g.name].cpu()).flatten().tolist()
        for m in g.members:
            entries = gone.setdefault((m.param, m.dim), set())
            for unit in removed:
                entries.update(m.index(unit).tolist())
    return {
        (param, dim): torch.tensor(
            [i for i in range(shapes[param][dim]) if i not in entries], dtype=torch.long
        )
        for (param, dim), entries in gone.items()
    }


def _pad_recurrent(
    model: nn.Module, groups: list[UnitGroup], keep: dict[str, Tensor]
) -> dict[str, Tensor]:
    """keep with the layers of each nn.LSTM/GRU equalised to their largest kept count by
    keeping back the lowest-numbered removed units (zeroed already, so inert)."""
    modules = dict(model.named_modules())
    layers: dict[str, list[UnitGroup]] = {}
    for g in groups:
        owner = next(m.param for m in g.members if m.role == "out").rpartition(".")[0]
        if isinstance(modules.get(owner), (nn.LSTM, nn.GRU)):
            layers.setdefault(owner, []).append(g)
    padded = dict(keep)
    for stack in layers.values():
        width = max(int(keep[g.name].sum()) for g in stack)
        for g in stack:
            mask = keep[g.name].clone().cpu()
            spare = torch.nonzero(~mask).flatten()[: width - int(mask.sum())]
            mask[spare] = True
            padded[g.name] = mask
    return padded


def _take(t: Tensor, index: dict[int, Tensor]) -> Tensor:
    for dim, idx in sorted(index.items()):
        t = t.index_select(dim, idx.to(t.device))
    return t


def _param(old: Tensor, index: dict[int, Tensor]) -> nn.Parameter:
    return nn.Parameter(_take(old.detach(), index).clone(), requires_grad=old.requires_grad)


def _shrink_module(root: nn.Module, owner: str, module: nn.Module, index) -> None:
    """Slice one module's parameters (index: (local param, dim) -> kept positions)."""

    def dims(local: str) -> dict[int, Tensor]:
        return {d: i for (p, d), i in index.items() if p == local}

    if isinstance(module, (nn.LSTM, nn.GRU)):
        _rebuild_recurrent(root, owner, module, dims)
        return
    if not isinstance(module, (nn.Linear, *_CONV, *_NORM)):
        raise SettingError(
            f"cannot shrink layer {owner!r} ({type(module).__name__}): structured shrinking "
            "supports Linear, Conv1d/2d/3d, BatchNorm, nn.LSTM/GRU and attention heads"
        )
    w_dims, b_dims = dims("weight"), dims("bias")
    # a row goes if any member removes it (the weight row or the bias entry)
    rows = _common(w_dims.get(0), b_dims.get(0)) if 0 in w_dims or 0 in b_dims else None
    out_index = {0: rows} if rows is not None else {}
    weight_index = dict(out_index)
    if 1 in w_dims:
        weight_index[1] = w_dims[1]
    if module.weight is not None:
        module.weight = _param(module.weight, weight_index)
    if module.bias is not None:
        module.bias = _param(module.bias, out_index)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _CONV):
        if module.groups != 1:
            raise SettingError(f"cannot shrink grouped convolution {owner!r}")
        module.out_channels, module.in_channels = module.weight.shape[:2]
    else:
        for buf in ("running_mean", "running_var"):
            if getattr(module, buf) is not None and rows is not None:
                setattr(module, buf, _take(getattr(module, buf), out_index).clone())
        if rows is not None:
            module.num_features = len(rows)


def _common(*indices: Tensor | None) -> Tensor:
    """Positions kept by every index given (None = all kept)."""
    sets = [set(i.tolist()) for i in indices if i is not None]
    return torch.tensor(sorted(set.intersection(*sets)), dtype=torch.long)


def _rebuild_recurrent(root: nn.Module, owner: str, module, dims) -> None:
    """A new nn.LSTM/GRU of the smaller input/hidden size holding the kept slices."""
    hidden_rows = dims("weight_hh_l0").get(1)
    hidden = len(hidden_rows) if hidden_rows is not None else module.hidden_size
    inputs = dims("weight_ih_l0").get(1)
    input_size = len(inputs) if inputs is not None else module.input_size
    new = type(module)(
        input_size, hidden, num_layers=module.num_layers, bias=module.bias,
        batch_first=module.batch_first, dropout=module.dropout,
        bidirectional=module.bidirectional, **_proj(module),
        device=module.weight_ih_l0.device, dtype=module.weight_ih_l0.dtype,
    )  # fmt: skip
    with torch.no_grad():
        for name in module._flat_weights_names:
            sliced = _take(getattr(module, name).detach(), dims(name))
            target = getattr(new, name)
            if tuple(sliced.shape) != tuple(target.shape):
                raise SettingError(
                    f"cannot shrink layer {owner!r}: {name} would be {tuple(sliced.shape)}, "
                    f"its layer needs {tuple(target.shape)} (groups of unequal layers?)"
                )
            target.copy_(sliced)
            target.requires_grad_(getattr(module, name).requires_grad)
    new.train(module.training)
    parent, _, leaf = owner.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _proj(module) -> dict:
    return {"proj_size": module.proj_size} if getattr(module, "proj_size", 0) else {}


def _set_heads(root: nn.Module, group: UnitGroup, heads: int) -> None:
    first = next(m.param for m in group.members if m.role == "out")
    attn = first.rsplit(".", 2)[0]  # 'blocks.0.attn.q.weight' -> 'blocks.0.attn'
    module = root.get_submodule(attn)
    if not hasattr(module, "heads"):
        raise SettingError(f"cannot shrink heads of {attn!r}: it has no 'heads' attribute")
    module.heads = heads
