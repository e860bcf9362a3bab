"""Turning a module into an in-memory ModelProto with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from prunekit.errors import ModelError, SettingError, choice_error
from prunekit.types import call_model

from .axes import make_axes, token_axes
from .modes import (  # noqa: F401 - re-exported: these names lived here
    DEFAULT_OPSET,
    EXPORTERS,
    OPSET_RANGES,
    SUPPORTED_OPSETS,
    check_opset_supported,
    opset_ranges,
)

log = logging.getLogger(__name__)

OUTPUT = "output"

# An example input: one tensor [N, ...] (graph input 'input'), or a dict name -> tensor [N, ...]
# passed to the model as keyword arguments (graph inputs named after the keys, in order).
Example = Tensor | dict[str, Tensor]
# How the model is fed an example: ``call(model, inputs) -> outputs`` (a task's argument
# mapping); None = ``call_model``: a tensor positionally, a dict as keyword arguments.
Forward = Callable[[nn.Module, Example], Any]


def input_axes(example: Example) -> dict[str, dict[int, str]]:
    """Graph input name -> {axis: dynamic dim name}, in graph input order, as inferred
    from the example alone (see :mod:`export.axes`; no asked axes, no padding check).

    A tensor: {'input': {0: 'batch'}}. A dict: dim 0 of every input is 'batch'; dim 1 is
    'sequence' for integer/bool inputs of rank >= 2 (token ids, attention masks) and for
    float inputs of rank >= 2 whose dim 1 has their length T (float masks, per-token
    features (B, T, F)); a dict without integer/bool inputs keeps dim 1 static.
    """
    return make_axes(example, inferred=token_axes(example)).dims


def _keyword_names(net: nn.Module) -> tuple[list[str], bool]:
    """(names ``net.forward`` accepts as keywords, whether it takes **kwargs)."""
    try:
        params = inspect.signature(net.forward).parameters.values()
    except (TypeError, ValueError):  # builtins/scripted modules without a signature
        return [], True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in kinds]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def as_example(net: nn.Module, example, what: str = "example_input", keywords: bool = True):
    """``example`` detached on the CPU, checked: a tensor [N, ...] or a non-empty dict of
    tensors [N, ...] with one N; with ``keywords`` (the model is called as
    ``net(**example)``) its keys must be keyword arguments of ``net.forward``.

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
    names, var_kw = _keyword_names(net) if keywords else ([], True)
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


class Call(nn.Module):
    """The module an exporter sees: ``forward(*graph inputs)`` rebuilds the example's form
    (one tensor, or a dict in the graph inputs' order) and returns ``call(net, inputs)``:
    the model fed exactly as the task feeds it (``call_model`` by default)."""

    def __init__(self, net: nn.Module, call: Forward | None, keys: list[str] | None):
        super().__init__()
        self.net, self.call, self.keys = net, call or call_model, keys

    def forward(self, *args: Tensor):
        inputs = args[0] if self.keys is None else dict(zip(self.keys, args, strict=True))
        return self.call(self.net, inputs)


def wrap(net: nn.Module, example: Example, call: Forward | None = None) -> nn.Module:
    """``net`` itself for a tensor fed positionally (its graph keeps the model's own
    initializer names), else a :class:`Call` around it."""
    if call is None and isinstance(example, Tensor):
        return net
    return Call(net, call, None if isinstance(example, Tensor) else list(example))


def _values(x: Example) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x.values())


def _torchscript(net: nn.Module, x: Example, opset: int, axes: dict) -> onnx.ModelProto:
    buf = io.BytesIO()
    try:
        torch.onnx.export(
            net, _values(x), buf, dynamo=False, input_names=list(axes), output_names=[OUTPUT],
            dynamic_axes={**axes, OUTPUT: {0: "batch"}}, opset_version=opset, verbose=False,
            do_constant_folding=True,
        )  # fmt: skip
    finally:
        # torch 2.13's setup_onnx_logging tests a function object, not its result, so every
        # export leaves the C++ ONNX log (IR dumps to fd 1) on for the rest of the process
        with contextlib.suppress(AttributeError):
            torch._C._jit_set_onnx_log_enabled(False)
    return onnx.load_from_string(buf.getvalue())


def _at_least_two(x: Tensor) -> Tensor:
    """A batch of >= 2 rows: a batch of 1 makes torch.export specialise the dimension."""
    return x if x.shape[0] >= 2 else x[:1].expand(2, *x.shape[1:]).contiguous()


def _dynamo(net: nn.Module, x: Example, opset: int, axes: dict) -> onnx.ModelProto:
    dims: dict[str, Dim] = {}
    shapes = tuple(
        {a: dims.setdefault(d, Dim(d)) for a, d in ax.items()} for ax in axes.values()
    )  # one Dim per name: axes of one name stay tied
    program = torch.onnx.export(
        net, tuple(_at_least_two(v) for v in _values(x)), dynamo=True,
        input_names=list(axes), output_names=[OUTPUT],
        dynamic_shapes=(shapes,) if isinstance(net, Call) else shapes,  # Call takes *args
        opset_version=opset, external_data=False, verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    _order_inputs(proto, list(axes))
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

#: Loggers the exporters write through (torch._logging puts its own stderr handler on "torch").
_EXPORTER_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")
#: Warnings about the torch.onnx API prunekit calls, identical for every model: not logged.
_API_NOTICES = (r".*'dynamic_axes' is not recommended", r".*legacy TorchScript-based ONNX")


class Exported(NamedTuple):
    """What :func:`export_proto` made: the model, the exporter that made it, everything the
    exporters printed (warnings, log records, stdout/stderr of Python and C++, each failed
    attempt's full error; '' when silent) and why the first exporter was not used (or None)."""

    proto: onnx.ModelProto
    exporter: str
    log: str
    fallback: str | None


@contextmanager
def _fd_capture(sink) -> Iterator[None]:
    """Point file descriptors 1 and 2 at ``sink`` (C++ code writes there, not to sys.stdout)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors 1/2 (a detached process): nothing to capture
        yield
        return
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        _flush_c_stdio()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)


def _flush_c_stdio() -> None:
    """fflush(NULL): C/C++ buffers must empty into the sink before the descriptors go back."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _exporter_loggers() -> list[logging.Logger]:
    """The exporters' top loggers, then every descendant with handlers of its own (torch's
    logging setup gives e.g. 'torch.onnx' a stderr handler and propagate=False)."""
    tops = [logging.getLogger(n) for n in _EXPORTER_LOGGERS]
    names = [
        n for n, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and lg.handlers
        and any(n.startswith(top + ".") for top in _EXPORTER_LOGGERS)
    ]  # fmt: skip
    return tops + [logging.getLogger(n) for n in names]


@contextmanager
def _captured_loggers(text: io.StringIO) -> Iterator[None]:
    """Records of the exporters' loggers (WARNING and up) go to ``text`` and nowhere else."""
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = _exporter_loggers()
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    try:
        for k, lg in enumerate(loggers):
            lg.handlers, lg.propagate = [handler], False
            if k < len(_EXPORTER_LOGGERS):  # descendants keep their levels
                lg.setLevel(logging.WARNING)
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


@contextmanager
def capture_output() -> Iterator[io.StringIO]:
    """Everything printed inside the block, into the yielded buffer (filled on exit).

    Python's sys.stdout/sys.stderr, the exporters' loggers, warnings (one line per distinct
    warning; deprecation notices about the torch.onnx API itself are dropped) and the C/C++
    side's writes to file descriptors 1 and 2, e.g. the IR graph the TorchScript exporter
    dumps when it fails. Nothing reaches the terminal.
    """
    text = io.StringIO()
    with tempfile.TemporaryFile() as raw, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for pattern in _API_NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            with _fd_capture(raw), _captured_loggers(text):
                with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                    yield text
        finally:
            raw.seek(0)
            text.write(raw.read().decode("utf-8", errors="replace"))
            seen = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
            text.write("".join(f"{line}\n" for line in seen))


def _order(exporter: str, opset: int) -> tuple[list[str], list[str]]:
    """(exporters that write ``opset``, ``exporter`` first; why each other one is left out)."""
    if exporter not in EXPORTERS:
        raise choice_error("exporter", exporter, EXPORTERS)
    check_opset_supported(opset)
    able = [e for e in EXPORTERS if OPSET_RANGES[e][0] <= opset <= OPSET_RANGES[e][1]]
    order = sorted(able, key=lambda e: e != exporter)
    skipped = [
        f"the {e} exporter writes opsets {OPSET_RANGES[e][0]}..{OPSET_RANGES[e][1]}, not {opset}"
        for e in sorted(set(EXPORTERS) - set(able), key=lambda e: e != exporter)
    ]
    return order, skipped


def _one_line(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause: the dynamo exporter wraps the real reason
    (e.g. 'No ONNX function found for aten.cummax') in a generic 'step 3/3' ConversionError."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    plain = _ANSI.sub("", str(root)).strip()
    return f"{type(root).__name__}: {(plain.splitlines() or [''])[0][:300]}"


def _attempt(name: str, net: nn.Module, example: Example, opset: int, axes: dict) -> tuple:
    """(proto or None, captured output, one-line failure or None) of one exporter."""
    proto, failure = None, None
    with capture_output() as text:
        try:
            proto = _RUNNERS[name](net, example, opset, axes)
        except Exception as exc:  # exporters raise many types; the caller reports them all
            failure = _one_line(exc)
            print(f"{name} exporter failed: {type(exc).__name__}: {_ANSI.sub('', str(exc))}")
    if proto is not None and opset_of(proto) != opset:  # e.g. dynamo's failed conversion
        failure = f"it wrote opset {opset_of(proto)}, not the requested {opset}"
        proto = None
    output = text.getvalue()
    if failure and failure not in output:
        output += f"{name} exporter failed: {failure}\n"
    return proto, output, failure


def export_proto(
    net: nn.Module,
    example: Example,
    opset: int,
    exporter: str = "torchscript",
    axes: dict[str, dict[int, str]] | None = None,
    call: Forward | None = None,
) -> Exported:
    """Export ``net`` at exactly ``opset``: tries ``exporter`` first, then the other one.

    example: a tensor (graph input 'input') or a dict (graph inputs named after the keys,
    in the dict's order, dtypes kept); the graph takes exactly these tensors and feeds
    them to the model through ``call(net, inputs)`` (None: a tensor positionally, a dict
    as keyword arguments). axes: graph input -> {axis: dim name} of its dynamic axes
    (default :func:`input_axes`); the first output is 'output' with dynamic dim 0.
    Only exporters whose ``OPSET_RANGES`` hold ``opset`` are tried, and a model written at
    another opset counts as a failure: the opset is never silently replaced. Everything
    the exporters print is captured into ``Exported.log``, never shown. Raises
    SettingError for an opset no exporter writes, ModelError naming every failure if no
    exporter can handle the model.
    """
    order, skipped = _order(exporter, opset)
    axes = input_axes(example) if axes is None else axes
    net = wrap(net, example, call)
    logs, errors = [], []
    # a fallback names why the asked exporter was not used: left out for the opset, or failed
    reasons = [r for r in skipped if r.startswith(f"the {exporter} ")]
    for name in order:
        proto, output, failure = _attempt(name, net, example, opset, axes)
        if output:
            logs.append(f"== {name} exporter, opset {opset} ==\n{output}")
        if failure is None:
            fallback = "; ".join(reasons) if reasons else None
            return Exported(proto, name, "".join(logs), fallback)
        log.debug("%s exporter failed: %s", name, failure)
        errors.append(f"{name}: {failure}")
        reasons.append(f"the {name} exporter failed ({failure})")
    model = net.net if isinstance(net, Call) else net
    raise ModelError(
        f"no ONNX exporter could handle {type(model).__name__} at opset {opset}: "
        + " | ".join(errors + skipped)
    )


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
