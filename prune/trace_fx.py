"""The torch.fx half of prune/trace.py: candidate units followed along a traced graph.

Every tensor's channel axis (dim 1 of a conv activation, the last dim of a Linear's) is a
tuple of segments: ``count`` channels of ``width`` entries each (width = H*W once a conv
activation is flattened into a Linear), owned by a candidate group or by nobody (fixed
channels: model inputs, parameters, excluded groups). Producers (Linear, Conv with groups=1)
start a candidate; BatchNorm adds its entries; elementwise ops, pooling, flatten and
concatenation carry segments; an addition or product of two channel-aligned tensors ties
their candidates into one group; consumers (Linear, Conv) add their input columns.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.errors import SettingError, first_line
from prunekit.prune.groups import Member, UnitGroup

_HINT = ("structured pruning follows Linear/Conv/BatchNorm chains, elementwise activations, "
         "pooling, flatten, residual additions and concatenations")  # fmt: skip


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
    nn.Hardtanh, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
}  # fmt: skip
_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                  nn.InstanceNorm3d, nn.LocalResponseNorm)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.tanh,
    F.sigmoid, F.leaky_relu, F.hardtanh, F.softplus, F.mish, F.hardswish, F.dropout,
    F.dropout1d, F.dropout2d, operator.neg, torch.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "clone", "neg", "float",
                        "double", "relu_", "tanh_", "sigmoid_", "to"}  # fmt: skip
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
           operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div,
           "add", "sub", "mul", "div", "add_", "mul_"}  # fmt: skip
_DIVIDES = {operator.truediv, torch.div, "div"}
# row-major reshapes, read off the shapes (exact for the traced batch's memory layout)
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", torch.flatten,
             torch.reshape, torch.squeeze, torch.unsqueeze}  # fmt: skip
_PERMUTES = {"transpose", "permute", torch.transpose, torch.permute}
_REDUCTIONS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
            "log_softmax"}  # fmt: skip
_SHAPE_ONLY = {"size", "dim", "numel"}
OUTPUT = "output units of the model"


@dataclass(frozen=True)
class _Seg:
    gid: int | None  # candidate group id, None = fixed channels
    count: int
    width: int = 1


@dataclass(frozen=True)
class _Val:
    dim: int  # the channel axis, counted from the front
    segs: tuple[_Seg, ...]


class _Groups:
    """Candidate groups with union-find (residual additions tie producers together)."""

    def __init__(self):
        self.parent, self.names, self.kinds, self.sizes, self.members = [], [], [], [], []
        self.excluded: dict[int, str] = {}

    def new(self, name: str, kind: str, size: int, members: list[Member]) -> int:
        self.parent.append(len(self.parent))
        self.names.append([name])
        self.kinds.append(kind)
        self.sizes.append(size)
        self.members.append(list(members))
        return len(self.parent) - 1

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            gid = self.parent[gid]
        return gid

    def live(self, seg: _Seg) -> bool:
        return seg.gid is not None and self.find(seg.gid) not in self.excluded

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        self.names[a] += self.names[b]
        self.members[a] += self.members[b]
        if b in self.excluded:
            self.excluded.setdefault(a, self.excluded[b])

    def exclude(self, gid: int, reason: str) -> None:
        self.excluded.setdefault(self.find(gid), reason)

    def add(self, gid: int, member: Member) -> None:
        self.members[self.find(gid)].append(member)

    def result(self) -> tuple[list[UnitGroup], dict[str, str]]:
        groups, excluded = [], {}
        for gid in range(len(self.parent)):
            if self.find(gid) != gid:
                continue
            name = "+".join(self.names[gid])
            if gid in self.excluded:
                excluded[name] = self.excluded[gid]
            else:
                members = tuple(dict.fromkeys(self.members[gid]))
                groups.append(UnitGroup(name, self.kinds[gid], self.sizes[gid], members))
        return groups, excluded


def fx_groups(model: nn.Module, example_inputs) -> tuple[list[UnitGroup], dict[str, str]]:
    """Unit groups of a torch.fx-traceable ``model`` (see the module docstring)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the user needs the first line only
        raise SettingError(
            f"model {type(model).__name__} cannot be traced by torch.fx to find its unit "
            f"groups ({first_line(exc, 160)}); {_HINT}"
        ) from exc
    _propagate_shapes(model, gm, example_inputs)
    walker = _Walker(gm)
    for node in gm.graph.nodes:
        walker.visit(node)
    return walker.groups.result()


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, example_inputs) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, dict):
        args = [example_inputs.get(n) for n in names]
    elif isinstance(example_inputs, (tuple, list)):
        args = list(example_inputs)
    else:
        args = [example_inputs]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # eval: BatchNorm statistics and dropout untouched
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise SettingError(
            f"example inputs do not run through {type(model).__name__} for unit tracing: "
            f"{first_line(exc, 160)}"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


class _Walker:
    """Visits the graph in order, giving each tensor node a _Val (or None: no candidates)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.groups, self.vals = gm, _Groups(), {}
        self.modules = dict(gm.named_modules())
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # ------------------------------------------------------------ helpers
    def val(self, arg) -> _Val | None:
        return self.vals.get(arg) if isinstance(arg, fx.Node) else None

    def live(self, val: _Val | None) -> list[int]:
        if val is None:
            return []
        return [self.groups.find(s.gid) for s in val.segs if self.groups.live(s)]

    def inputs(self, node) -> list[fx.Node]:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return found

    def refuse(self, node, what: str):
        stack = node.meta.get("nn_module_stack") or {}
        layer = node.target if node.op == "call_module" else next(reversed(stack), None)
        names = sorted({"+".join(self.groups.names[g]) for n in self.inputs(node)
                        for g in self.live(self.vals.get(n))})  # fmt: skip
        where = f"layer {layer!r}" if layer else f"op {node.name!r}"
        raise SettingError(
            f"cannot prove the units of {', '.join(map(repr, names))} removable: {where} {what}; "
            f"{_HINT}"
        )

    def exclude_all(self, node, reason: str) -> None:
        for n in self.inputs(node):
            for gid in self.live(self.vals.get(n)):
                self.groups.exclude(gid, reason)

    # ------------------------------------------------------------ dispatch
    def visit(self, node) -> None:
        if node.op in ("placeholder", "get_attr"):
            self.vals[node] = None
        elif node.op == "output":
            self.exclude_all(node, OUTPUT)
        elif node.op == "call_module":
            self.vals[node] = self.module(node, self.modules[node.target])
        else:
            self.vals[node] = self.function(node, node.target)

    def first(self, node) -> _Val | None:
        """The val of the op's first argument (positional, else the first keyword)."""
        return self.val(_first_arg(node))

    def function(self, node, fn) -> _Val | None:
        x = self.first(node)
        if not any(self.live(self.val(n)) for n in self.inputs(node)):
            return None  # nothing removable reads this op: it cannot matter
        if fn in _ELEMENTWISE_FUNCTIONS or fn in _ELEMENTWISE_METHODS:
            return x
        if fn in _SHAPE_ONLY or fn == getattr and node.args[1] in ("shape", "dtype", "device"):
            return None
        if fn in _BINARY:
            return self.binary(node, fn)
        if fn in _RESHAPES:
            return self.reshape(node, x)
        if fn in _PERMUTES:
            return self.permute(node, x)
        if fn in (torch.cat, torch.concat):
            return self.concat(node)
        if fn in _POOL_FUNCTIONS:
            return self.pool(node, x, bool(node.kwargs.get("return_indices", False)))
        if fn in _REDUCTIONS:
            return self.reduce(node, x)
        if fn in _SOFTMAX:
            return self.softmax(node, x, node.kwargs.get("dim", _arg(node, 1)))
        if fn is operator.getitem:
            return self.getitem(node, x)
        self.refuse(node, f"calls {getattr(fn, '__name__', fn)!s}, which is not understood")

    def module(self, node, mod: nn.Module) -> _Val | None:
        x = self.first(node)
        live = any(self.live(self.val(n)) for n in self.inputs(node))
        shared = self.calls[node.target] > 1 and any(True for _ in mod.parameters(False))
        if shared and live:
            self.refuse(node, f"is called {self.calls[node.target]} times (shared weights)")
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.linear_or_conv(node, mod, x, shared)
        if not live:
            return None
        if isinstance(mod, ELEMENTWISE_MODULES):
            return x
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            return self.batchnorm(node, mod, x)
        if isinstance(mod, _POOL_MODULES):
            return self.pool(node, x, getattr(mod, "return_indices", False))
        if type(mod) in (nn.LSTM, nn.GRU):
            return self.recurrent_reader(node, mod, x)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, mod.dim)
        if isinstance(mod, _CHANNEL_NORMS):
            self.exclude_all(node, f"normalised across channels by {node.target!r}")
            return None
        self.refuse(node, f"({type(mod).__name__}) is not understood")

    # ------------------------------------------------------------ rules
    def linear_or_conv(self, node, mod, x: _Val | None, shared: bool) -> _Val | None:
        conv = not isinstance(mod, nn.Linear)
        if conv and mod.groups != 1:
            if self.live(x):
                self.refuse(node, f"is a grouped convolution (groups={mod.groups})")
            return None
        out_shape, in_shape = _shape(node), _shape(_first_arg(node))
        if self.live(x):
            axis = 1 if conv else len(in_shape) - 1
            if x.dim != axis or (conv and any(s.width != 1 for s in x.segs)):
                self.refuse(node, "reads units along another axis than its input channels")
            offset = 0
            for s in x.segs:
                if self.groups.live(s):
                    member = Member(f"{node.target}.weight", 1, "in", s.width, offset=offset)
                    self.groups.add(s.gid, member)
                offset += s.count * s.width
        if shared or out_shape is None:
            return None
        members = [Member(f"{node.target}.weight", 0)]
        if mod.bias is not None:
            members.append(Member(f"{node.target}.bias", 0))
        size = mod.out_channels if conv else mod.out_features
        gid = self.groups.new(node.target, "channel" if conv else "neuron", size, members)
        return _Val(1 if conv else len(out_shape) - 1, (_Seg(gid, size),))

    def pool(self, node, x: _Val, indices: bool) -> _Val:
        """Pooling/resizing over the spatial axes: each channel on its own."""
        if indices or type(_shape(node)) is not tuple:
            self.refuse(node, "pools with indices (a tuple output)")
        if x.dim != 1 or len(_shape(node)) < 3 or any(s.width != 1 for s in x.segs):
            self.refuse(node, "pools across channels")
        return x

    def recurrent_reader(self, node, mod, x: _Val) -> None:
        """nn.LSTM/GRU reading units as input features: weight_ih_l0 columns (both
        directions). Its own hidden units are not offered here (SequenceClassifier's rule)."""
        if x.dim != len(_shape(_first_arg(node))) - 1:
            self.refuse(node, "reads units along another axis than its input features")
        names = ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if mod.bidirectional else [])
        offset = 0
        for s in x.segs:
            if self.groups.live(s):
                for name in names:
                    self.groups.add(s.gid, Member(f"{node.target}.{name}", 1, "in", s.width,
                                                  offset=offset))  # fmt: skip
            offset += s.count * s.width
        return None

    def batchnorm(self, node, mod, x: _Val) -> _Val:
        if x.dim != 1 or any(s.width != 1 for s in x.segs):
            self.refuse(node, "normalises another axis than the channels")
        offset = 0
        for s in x.segs:
            if self.groups.live(s):
                if not mod.affine:
                    self.groups.exclude(s.gid, f"BatchNorm {node.target!r} has no affine entries")
                else:
                    for p in ("weight", "bias"):
                        self.groups.add(s.gid, Member(f"{node.target}.{p}", 0, offset=offset))
            offset += s.count
        return x

    def binary(self, node, fn) -> _Val | None:
        """a (op) b: channel-aligned candidates are tied; fixed channels exclude them."""
        if fn in _DIVIDES and len(node.args) > 1:
            for gid in self.live(self.val(node.args[1])):
                self.groups.exclude(gid, f"divides another tensor at {node.name!r}")
        shape = _shape(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and _shape(a) is not None]
        vals = [self.val(a) for a in tensors]
        lead = next((v for v in vals if v is not None and self.live(v)), None)
        if lead is None:
            return None
        lead_arg = tensors[vals.index(lead)]
        axis_back = lead.dim - len(_shape(lead_arg))  # broadcasting aligns from the right
        for arg, v in zip(tensors, vals, strict=True):
            if arg is lead_arg:
                continue
            s, reason = _shape(arg), f"broadcast across channels at {node.name!r}"
            pos = len(s) + axis_back
            if pos < 0 or s[pos] == 1:  # scales/shifts every channel alike: harmless to lead
                self.exclude_val(v, reason)  # but v's own units would spread over them
            elif v is not None and v.dim == pos:
                self.tie(node, lead, v)
            else:
                self.exclude_val(v, reason)
                self.tie(node, lead, None)
        return _Val(len(shape) + axis_back, lead.segs)

    def exclude_val(self, v: _Val | None, reason: str) -> None:
        for gid in self.live(v):
            self.groups.exclude(gid, reason)

    def tie(self, node, a: _Val, b: _Val | None) -> None:
        if b is not None and [(s.count, s.width) for s in a.segs] == [
            (s.count, s.width) for s in b.segs
        ]:
            for sa, sb in zip(a.segs, b.segs, strict=True):
                if self.groups.live(sa) and sb.gid is not None and self.groups.live(sb):
                    self.groups.union(sa.gid, sb.gid)
                elif self.groups.live(sa) or (sb.gid is not None and self.groups.live(sb)):
                    reason = f"tied to channels that stay (residual {node.name!r})"
                    for s in (sa, sb):
                        if s.gid is not None:
                            self.groups.exclude(s.gid, reason)
            return
        for v in (a, b):
            for gid in self.live(v):
                self.groups.exclude(gid, f"tied to channels that stay (residual {node.name!r})")

    def reshape(self, node, x: _Val) -> _Val:
        """Flatten-like reshapes only: the channel axis merged with the axes after it."""
        src, out = _shape(_first_arg(node)), _shape(node)
        lead = math.prod(src[: x.dim])
        # the axes before the channels may only regroup among themselves (same product),
        # the channel axis must open a merged run of axes; the rest regroup freely
        for k in range(len(out)):
            if math.prod(out[:k]) != lead:
                continue
            for end in range(x.dim, len(src)):
                if out[k] == math.prod(src[x.dim : end + 1]):
                    scale = math.prod(src[x.dim + 1 : end + 1])
                    self.fixed_count(node, k, out[k], x)
                    return _Val(k, tuple(_Seg(s.gid, s.count, s.width * scale) for s in x.segs))
        self.refuse(node, f"reshapes {src} to {out}, which mixes the channels")

    def permute(self, node, x: _Val) -> _Val:
        """transpose(a, b) / permute(*dims): the channel axis moves, its entries do not."""
        ndim = len(_shape(_first_arg(node)))
        rest = [a for a in node.args[1:]] + list(node.kwargs.values())
        if node.target in ("transpose", torch.transpose):
            a, b = (int(d) % ndim for d in rest[:2])
            order = list(range(ndim))
            order[a], order[b] = b, a
        else:
            order = list(rest[0]) if len(rest) == 1 else list(rest)
            order = [int(d) % ndim for d in order]
        return _Val(order.index(x.dim), x.segs)

    def fixed_count(self, node, k: int, count: int, x: _Val) -> None:
        """A view/reshape that spells the channel axis as a literal would break once units
        are gone (sizes read off the tensor, -1 and flatten adapt): its units stay."""
        if node.target not in ("view", "reshape", torch.reshape):
            return
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        if k < len(sizes) and isinstance(sizes[k], int) and sizes[k] != -1:
            self.exclude_val(x, f"{node.name!r} reshapes to a literal {count} channels")

    def concat(self, node) -> _Val | None:
        parts = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", _arg(node, 1) or 0)
        shape = _shape(node)
        axis = dim % len(shape)
        vals = [self.val(p) for p in parts]
        lead = next(v for v in vals if v is not None and self.live(v))
        if lead.dim != axis:
            for v in vals:
                self.tie(node, lead, v)
            return lead
        segs = []
        for p, v in zip(parts, vals, strict=True):
            if v is not None and v.dim != axis:
                self.refuse(node, "concatenates tensors whose channels lie on different axes")
            segs += v.segs if v is not None else [_Seg(None, _shape(p)[axis])]
        return _Val(axis, tuple(segs))

    def reduce(self, node, x: _Val) -> _Val | None:
        dims = node.kwargs.get("dim", _arg(node, 1))
        keep = node.kwargs.get("keepdim", _arg(node, 2) or False)
        ndim = len(_shape(_first_arg(node)))
        dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else (dims or range(ndim)))]
        if x.dim in dims:
            self.exclude_all(node, f"summed across channels at {node.name!r}")
            return None
        return _Val(x.dim - (0 if keep else sum(d < x.dim for d in dims)), x.segs)

    def softmax(self, node, x: _Val, dim) -> _Val | None:
        if dim is None or dim % len(_shape(node)) == x.dim:
            self.exclude_all(node, f"softmax across channels at {node.name!r}")
            return None
        return x

    def getitem(self, node, x: _Val | None) -> _Val | None:
        index = node.args[1]
        if x is None:
            return None
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index) or Ellipsis in index:
            self.refuse(node, "indexes a hidden tensor by data (data-dependent indexing)")
        if None in index or len(index) > x.dim and index[x.dim] != slice(None):
            self.refuse(node, "indexes or slices the channel axis")
        dropped = sum(isinstance(i, int) for i in index[: x.dim])
        return _Val(x.dim - dropped, x.segs)


def _first_arg(node):
    args = list(node.args) + list(node.kwargs.values())
    return args[0] if args else None


def _arg(node, i: int):
    return node.args[i] if len(node.args) > i else None
