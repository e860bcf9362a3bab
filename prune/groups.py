"""Units and their parameter groups: the shared vocabulary of structured pruning.

A unit is what structured pruning removes as a whole: an output neuron of a Linear, an
output channel of a convolution, a hidden unit of an LSTM/GRU (every gate of it), an
attention head, an FFN hidden unit. Removing unit j of a ``UnitGroup`` zeroes (and, when the
model is shrunk, deletes) a set of entries in several parameters: the producing layer's row
and bias entry, its BatchNorm entries, the consuming layer's input column(s). Each such
parameter is a ``Member``; the entries of unit j along the member's ``dim`` are

    offset + b * stride + j * width + w      for b in range(blocks), w in range(width)

(an LSTM's weight_ih has blocks=4 gates with stride=hidden; a head owns width=head_dim
consecutive rows; a flattened conv channel feeding a Linear owns width=H*W columns).

Pure functions only: which entries a unit owns and the keep-masks (True = keep) of the
parameters for a choice of kept units. Finding the groups (tracing) is ``prune/trace.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.errors import SettingError
from prunekit.types import Masks

ROLES = ("out", "in")


@dataclass(frozen=True)
class Member:
    """One parameter's share of a unit group.

    param: parameter name (``model.named_parameters()``); dim: the dimension indexed by
    units; role: 'out' = the unit's own entries (producing row, bias, norm entries), 'in' =
    where a consumer reads the unit (an input column); width/blocks/stride/offset: the
    entries of unit j along ``dim`` (module docstring).
    """

    param: str
    dim: int
    role: str = "out"
    width: int = 1
    blocks: int = 1
    stride: int = 0
    offset: int = 0

    def index(self, unit: int) -> Tensor:
        """The entries of ``unit`` along ``dim`` (int64, ascending within each block)."""
        base = self.offset + unit * self.width
        starts = [base + b * self.stride for b in range(self.blocks)]
        return torch.cat([torch.arange(s, s + self.width) for s in starts])

    def span(self, units: int) -> int:
        """Entries along ``dim`` that ``units`` units cover, the last one's end included."""
        return self.offset + (self.blocks - 1) * self.stride + units * self.width


@dataclass(frozen=True)
class UnitGroup:
    """``size`` units that are removed together across ``members``.

    name: a readable label (the producing module, e.g. '0' or 'blocks.1.attn:heads');
    kind: 'neuron', 'channel', 'hidden', 'head' or 'ffn'; members: every parameter a unit
    owns or is read by; at least one 'out' member.
    """

    name: str
    kind: str
    size: int
    members: tuple[Member, ...]

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """SettingError unless every member names a parameter whose ``dim`` holds the units."""
        if not any(m.role == "out" for m in self.members):
            raise SettingError(f"unit group {self.name!r} has no producing ('out') member")
        for m in self.members:
            if m.role not in ROLES or m.param not in shapes:
                raise SettingError(f"unit group {self.name!r}: bad member {m!r}")
            if not 0 <= m.dim < len(shapes[m.param]) or m.span(self.size) > shapes[m.param][m.dim]:
                raise SettingError(
                    f"unit group {self.name!r}: {self.size} units do not fit dim {m.dim} of "
                    f"{m.param!r} {tuple(shapes[m.param])}"
                )


def unit_param_masks(
    groups: list[UnitGroup], keep: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]
) -> Masks:
    """Keep-masks (True = keep) of every member parameter for the kept units ``keep``.

    keep: group name -> bool (size,) (True = the unit stays); shapes: parameter shapes.
    A parameter in several groups (a Linear's columns read unit j of the previous layer,
    its rows are its own units) is False wherever any group removes it. Parameters of no
    group are absent from the result.
    """
    masks: Masks = {}
    for group in groups:
        kept = keep[group.name]
        if kept.shape != (group.size,):
            raise SettingError(
                f"unit keep-mask of {group.name!r} has shape {tuple(kept.shape)}, "
                f"expected ({group.size},)"
            )
        gone = torch.nonzero(~kept.cpu()).flatten().tolist()
        for m in group.members:
            mask = masks.setdefault(m.param, torch.ones(shapes[m.param], dtype=torch.bool))
            if gone:
                idx = torch.cat([m.index(j) for j in gone])
                mask.index_fill_(m.dim, idx, False)
    return masks


def unit_entries(group: UnitGroup, params: dict[str, Tensor], unit: int) -> list[Tensor]:
    """The values of every member entry of ``unit`` (one flat tensor per member, member
    order), e.g. for a group L2 norm or a group Taylor term."""
    return [
        params[m.param].detach().index_select(m.dim, m.index(unit).to(params[m.param].device))
        .reshape(-1)
        for m in group.members
    ]  # fmt: skip
