"""Turning a module into an in-memory ModelProto with a dynamic batch dimension."""

from __future__ import annotations

import inspect
import io
import logging
import re
import warnings
from contextlib import contextmanager

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from prunekit.errors import ModelError, SettingError, choice_error

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18  # TorchScript and dynamo exporters both support it; >= 13 for int8
OUTPUT = "output"

# An example input: one tensor [N, ...] (graph input 'input'), or a dict name -> tensor [N, ...]
# passed to the model as keyword arguments (graph inputs named after the keys, in order).
Example = Tensor | dict[str, Tensor]


def _is_token_like(value: Tensor) -> bool:
    """Integer or bool tensor of rank >= 2: token ids, attention masks (B, T, ...)."""
    return value.dim() >= 2 and not torch.is_floating_point(value) and not value.is_complex()


def input_axes(example: Example) -> dict[str, dict[int, str]]:
    """Graph input name -> {axis: dynamic dim name}, in graph input order.

    A tensor: {'input': {0: 'batch'}}. A dict: dim 0 of every input is 'batch'; dim 1 is
    'sequence' for integer/bool inputs of rank >= 2 (token ids, attention masks) and for
    float inputs of rank >= 2 whose dim 1 has their length T (float masks, per-token
    features (B, T, F)); a dict without integer/bool inputs keeps dim 1 static.
    """
    if isinstance(example, Tensor):
        return {"input": {0: "batch"}}
    lengths = {int(v.shape[1]) for v in example.values() if _is_token_like(v)}
    axes = {}
    for name, value in example.items():
        axes[name] = {0: "batch"}
        if _is_token_like(value) or (value.dim() >= 2 and int(value.shape[1]) in lengths):
            axes[name][1] = "sequence"
    return axes


def _keyword_names(net: nn.Module) -> tuple[list[str], bool]:
    """(names ``net.forward`` accepts as keywords, whether it takes **kwargs)."""
    try:
        params = inspect.signature(net.forward).parameters.values()
    except (TypeError, ValueError):  # builtins/scripted modules without a signature
        return [], True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in kinds]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def as_example(net: nn.Module, example, what: str = "example_input") -> Example:
    """``example`` detached on the CPU, checked: a tensor [N, ...] or a non-empty dict of
    tensors [N, ...] with one N, whose keys are keyword arguments of ``net.forward``.

    Raises SettingError for a value that is not a tensor/dict of tensors or has no batch
    dim, ModelError for a key ``net.forward`` does not take or mismatched batch sizes.
    """
    if isinstance(example, Tensor):
        if example.dim() < 1:
            raise SettingError(f"{what} must have a batch dimension; got a 0-d tensor")
        return example.detach().cpu()
    if not isinstance(example, dict) or not example:
        raise SettingError(
            f"{what} must be a tensor [N, ...] or a dict name -> tensor [N, ...]; "
            f"got {type(example).__name__}{' (empty)' if isinstance(example, dict) else ''}"
        )
    names, var_kw = _keyword_names(net)
    for key, value in example.items():
        if not isinstance(key, str) or not (var_kw or key in names):
            raise ModelError(
                f"{what} key {key!r} is not an argument of {type(net).__name__}.forward; "
                f"valid keys: {', '.join(names) or '(none)'}"
            )
        if not isinstance(value, Tensor) or value.dim() < 1:
            raise SettingError(f"{what}[{key!r}] must be a tensor [N, ...] with a batch dim")
    sizes = {k: int(v.shape[0]) for k, v in example.items()}
    if len(set(sizes.values())) > 1:
        raise ModelError(f"{what} tensors disagree on the batch size (dim 0): {sizes}")
    return {k: v.detach().cpu() for k, v in example.items()}


class _Keywords(nn.Module):
    """Calls ``net(**dict(zip(keys, args)))``: positional graph inputs in the dict's order."""

    def __init__(self, net: nn.Module, keys: list[str]):
        super().__init__()
        self.net, self.keys = net, list(keys)

    def forward(self, *args: Tensor):
        return self.net(**dict(zip(self.keys, args, strict=True)))


def _torchscript(net: nn.Module, x: Example, opset: int) -> onnx.ModelProto:
    axes = input_axes(x)
    args = (x,) if isinstance(x, Tensor) else tuple(x.values())
    if not isinstance(x, Tensor):
        net = _Keywords(net, list(x))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            net, args, buf, dynamo=False, input_names=list(axes), output_names=[OUTPUT],
            dynamic_axes={**axes, OUTPUT: {0: "batch"}}, opset_version=opset, verbose=False,
            do_constant_folding=True,
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def _at_least_two(x: Tensor) -> Tensor:
    """A batch of >= 2 rows: a batch of 1 makes torch.export specialise the dimension."""
    return x if x.shape[0] >= 2 else x[:1].expand(2, *x.shape[1:]).contiguous()


def _dynamo(net: nn.Module, x: Example, opset: int) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(x, Tensor):
            program = torch.onnx.export(
                net, (_at_least_two(x),), dynamo=True, input_names=["input"],
                output_names=[OUTPUT], dynamic_axes={"input": {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=opset, external_data=False, verbose=False,
            )  # fmt: skip
        else:
            dims = {"batch": Dim("batch"), "sequence": Dim("sequence")}
            shapes = {k: {a: dims[d] for a, d in ax.items()} for k, ax in input_axes(x).items()}
            program = torch.onnx.export(
                net, (), kwargs={k: _at_least_two(v) for k, v in x.items()}, dynamo=True,
                output_names=[OUTPUT], dynamic_shapes=shapes, opset_version=opset,
                external_data=False, verbose=False,
            )  # fmt: skip
    proto = program.model_proto
    if not isinstance(x, Tensor):
        _order_inputs(proto, list(x))
    return proto


def _order_inputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Put the graph inputs in ``names`` order (inputs the model ignores may be absent)."""
    rank = {n: i for i, n in enumerate(names)}
    inputs = sorted(proto.graph.input, key=lambda v: rank.get(v.name, len(rank)))
    kept = [onnx.ValueInfoProto() for _ in inputs]
    for dst, src in zip(kept, inputs, strict=True):
        dst.CopyFrom(src)
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


_RUNNERS = {"torchscript": _torchscript, "dynamo": _dynamo}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def _quiet_torch_loggers():
    """Silence torch's exporter loggers (they print tracebacks of a failed attempt)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_proto(
    net: nn.Module, example: Example, opset: int, exporter: str = "torchscript"
) -> tuple[onnx.ModelProto, str]:
    """(ModelProto, exporter used). Tries ``exporter`` first, then the other one.

    example: a tensor (graph input 'input') or a dict of keyword arguments (graph inputs
    named after the keys, in the dict's order, dtypes kept); dynamic axes as
    :func:`input_axes` says; the first output is 'output' with dynamic dim 0 ('batch').
    Raises ModelError naming both failures if neither exporter can handle the model.
    """
    if exporter not in EXPORTERS:
        raise choice_error("exporter", exporter, EXPORTERS)
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    errors = []
    for name in order:
        try:
            with _quiet_torch_loggers():
                proto = _RUNNERS[name](net, example, opset)
        except Exception as exc:  # exporters raise many types; we report them all
            plain = _ANSI.sub("", str(exc)).strip()
            first = (plain.splitlines() or [type(exc).__name__])[0]
            log.debug("%s exporter failed: %s", name, first)
            errors.append(f"{name}: {type(exc).__name__}: {first[:300]}")
            continue
        return proto, name
    raise ModelError(f"no ONNX exporter could handle {type(net).__name__}: " + " | ".join(errors))


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version the model declares."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_inputs(model: onnx.ModelProto) -> list[dict]:
    """[{'name', 'dtype', 'shape'}] of the graph inputs that are not initializers; shape
    entries are ints or the names of dynamic dims ('batch', 'sequence')."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in ttype.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        out.append({"name": value.name, "dtype": dtype, "shape": shape})
    return out
