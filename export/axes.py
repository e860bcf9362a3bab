"""Which axes of the graph inputs may change length: asked, inferred, named, checked.

Axis 0 of every graph input is the batch ('batch', always dynamic). Another axis is dynamic
when it is asked for (``NAME:DIM``: a graph input name and an axis index >= 1, as in
``--dynamic-axis input:1``) or inferred from the inputs:

- dict inputs: dim 1 of integer/bool inputs of rank >= 2 (token ids, attention masks) and
  of float inputs whose dim 1 has one of their lengths (float masks, per-token features);
- inputs of rank 2 or 3 (sequences (N, T), (N, T, F), audio (N, C, T); never images) whose
  examples vary in length along an axis: trailing zeros (padding) end them at different
  positions. Data of fixed shapes (nothing padded, or all padded alike) infers nothing.

Dynamic axes of equal length share one dimension name ('sequence', then 'sequence_2', ...),
so inputs padded to one length (token ids and their mask) stay tied. The exporter keeps an
inferred axis only where the model really runs at another length; an asked one must.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.errors import SettingError

BATCH = "batch"
INPUT = "input"  # the graph input of a single-tensor example


def graph_names(example) -> list[str]:
    """Graph input names of an example: 'input' for a tensor, else the dict's keys."""
    return [INPUT] if isinstance(example, Tensor) else list(example)


def items(example) -> list[tuple[str, Tensor]]:
    """(graph input name, tensor) pairs of an example (a tensor or a dict of tensors)."""
    return [(INPUT, example)] if isinstance(example, Tensor) else list(example.items())


def _shape(value: Tensor) -> str:
    return "(N" + "".join(f", {s}" for s in value.shape[1:]) + ")"


def parse_dynamic_axes(specs) -> tuple[tuple[str, int], ...]:
    """``NAME:DIM`` strings (or (name, dim) pairs) as (name, dim) pairs, duplicates dropped.

    Raises SettingError (one line) for a malformed spec or a DIM that is not an axis index
    >= 1 (axis 0 is the batch, always dynamic). Whether NAME and DIM fit the graph inputs
    is checked against the example (:func:`check_asked`).
    """
    if specs is None:
        return ()
    out = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            name, dim = spec
        elif isinstance(spec, str) and ":" in spec and spec.rpartition(":")[0]:
            name, _, dim = spec.rpartition(":")
            dim = int(dim) if dim.strip().lstrip("-").isdigit() else dim
        else:
            raise SettingError(
                f"--dynamic-axis {spec!r} must look like NAME:DIM (a graph input name and an "
                "axis index >= 1), e.g. input:1"
            )
        whole = isinstance(dim, numbers.Integral) and not isinstance(dim, bool)
        if not whole or dim < 1:
            raise SettingError(
                f"--dynamic-axis {name}:{dim}: DIM must be an axis index >= 1 (axis 0, the "
                "batch, is always dynamic), e.g. input:1"
            )
        out.append((name, int(dim)))
    return tuple(dict.fromkeys(out))


def check_asked(asked, example) -> None:
    """SettingError (one line) for an asked axis whose NAME is no graph input of ``example``
    or whose DIM is not one of that input's axes besides the batch."""
    shapes = dict(items(example))
    for name, dim in asked:
        if name not in shapes:
            have = ", ".join(f"{n} {_shape(v)}" for n, v in shapes.items())
            raise SettingError(
                f"--dynamic-axis {name}:{dim}: no graph input is named {name!r}; inputs: {have}"
            )
        rank = shapes[name].dim()
        if rank < 2:
            raise SettingError(
                f"--dynamic-axis {name}:{dim}: input {name!r} {_shape(shapes[name])} has only "
                "the batch axis; nothing else can be dynamic"
            )
        if dim >= rank:
            valid = "1" if rank == 2 else f"1..{rank - 1}"
            raise SettingError(
                f"--dynamic-axis {name}:{dim}: input {name!r} {_shape(shapes[name])} has no "
                f"axis {dim}; DIM must be {valid}"
            )


def _token_like(value: Tensor) -> bool:
    """Integer or bool tensor of rank >= 2: token ids, attention masks (B, T, ...)."""
    return value.dim() >= 2 and not torch.is_floating_point(value) and not value.is_complex()


def token_axes(example) -> set[tuple[str, int]]:
    """Dim 1 of a dict's integer/bool inputs of rank >= 2 and of its float inputs of rank
    >= 2 whose dim 1 has one of their lengths; nothing for a tensor."""
    if isinstance(example, Tensor):
        return set()
    lengths = {int(v.shape[1]) for v in example.values() if _token_like(v)}
    return {
        (name, 1)
        for name, v in example.items()
        if _token_like(v) or (v.dim() >= 2 and int(v.shape[1]) in lengths)
    }


def padded_axes(inputs, rows: int = 512) -> set[tuple[str, int]]:
    """Axes >= 1 of rank-2/3 inputs along which the examples (the first ``rows``) end at
    different positions: the last non-zero position differs, and some example is padded."""
    found = set()
    for name, value in items(inputs):
        if value.dim() not in (2, 3) or value.is_complex() or value.shape[0] < 2:
            continue
        nonzero = value[:rows] != 0
        for axis in range(1, value.dim()):
            others = tuple(a for a in range(1, value.dim()) if a != axis)
            along = nonzero.any(dim=others) if others else nonzero  # (n, T)
            length = along.shape[1]
            ends = (along * torch.arange(1, length + 1)).amax(1)  # last non-zero + 1
            if length > 1 and int(ends.min()) < length and ends.unique().numel() > 1:
                found.add((name, axis))
    return found


@dataclass(frozen=True)
class Axes:
    """The dynamic axes of the graph inputs.

    dims: graph input name -> {axis: dimension name}, in graph input order (axis 0 is
    'batch'); asked / inferred: the (input, axis) pairs beyond the batch and why each is
    dynamic (an axis both asked and inferred counts as asked).
    """

    dims: dict[str, dict[int, str]]
    asked: frozenset
    inferred: frozenset

    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """Dimension name -> the (input, axis) pairs that carry it (the batch left out)."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, axes in self.dims.items():
            for axis, dim in axes.items():
                if axis:
                    out.setdefault(dim, []).append((name, axis))
        return out

    def specs(self, pairs) -> list[str]:
        """'name:axis' of the pairs of this plan's dynamic axes that are in ``pairs``."""
        return [f"{n}:{a}" for n, axes in self.dims.items() for a in axes if a and (n, a) in pairs]

    def keeping(self, example, keep) -> Axes:
        """The same plan with only the non-batch axes in ``keep`` (names recomputed)."""
        return make_axes(example, self.asked & set(keep), self.inferred & set(keep))


def make_axes(example, asked=(), inferred=()) -> Axes:
    """The plan for ``example``: the batch of every input, plus the asked and inferred axes,
    with one dimension name per distinct length (first seen -> 'sequence')."""
    asked, inferred = frozenset(asked), frozenset(inferred) - frozenset(asked)
    names: dict[int, str] = {}
    dims = {}
    for name, value in items(example):
        dims[name] = {0: BATCH}
        for axis in range(1, value.dim()):
            if (name, axis) in asked or (name, axis) in inferred:
                size = int(value.shape[axis])
                names.setdefault(size, "sequence" + (f"_{len(names) + 1}" if names else ""))
                dims[name][axis] = names[size]
    return Axes(dims, asked, inferred)


def other_length(size: int, avoid: int) -> int:
    """A length to verify at, neither ``size`` nor ``avoid`` (the example's): about 3/4 of
    ``size``, or longer when that is impossible."""
    new = size - max(1, size // 4) if size >= 2 else size + 1
    if new == avoid:
        new = new - 1 if new >= 2 else max(size, avoid) + 1
    return new


def resized(example, lengths: dict[tuple[str, int], int]):
    """``example`` with axis ``a`` of input ``n`` cut (or, to grow it, its last slice
    repeated) to ``lengths[(n, a)]``."""
    out = {}
    for name, value in items(example):
        for (n, axis), new in lengths.items():
            if n != name:
                continue
            size = value.shape[axis]
            if new <= size:
                value = value.narrow(axis, 0, new)
            else:
                tail = value.narrow(axis, size - 1, 1)
                value = torch.cat([value, *[tail] * (new - size)], dim=axis)
        out[name] = value.contiguous()
    return out[INPUT] if isinstance(example, Tensor) else out


def group_lengths(axes: Axes, example, inputs, only=None) -> dict[tuple[str, int], int]:
    """(input, axis) -> the length to check ``inputs`` at, per dimension group (all of
    them, or the group named ``only``): another length than both inputs' and example's."""
    shapes, ex = dict(items(inputs)), dict(items(example))
    lengths = {}
    for dim, members in axes.groups().items():
        if only is not None and dim != only:
            continue
        name, axis = members[0]
        new = other_length(int(shapes[name].shape[axis]), int(ex[name].shape[axis]))
        lengths.update(dict.fromkeys(members, new))
    return lengths
