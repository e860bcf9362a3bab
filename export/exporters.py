"""Turning a module into an in-memory ModelProto with a dynamic batch dimension."""

from __future__ import annotations

import io
import logging
import re
import warnings
from contextlib import contextmanager

import onnx
import torch
from torch import Tensor, nn

from prunekit.errors import ModelError, choice_error

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18  # TorchScript and dynamo exporters both support it; >= 13 for int8
_AXES = {"input": {0: "batch"}, "output": {0: "batch"}}


def _torchscript(net: nn.Module, x: Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            net, (x,), buf, dynamo=False, input_names=["input"], output_names=["output"],
            dynamic_axes=_AXES, opset_version=opset, verbose=False, do_constant_folding=True,
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def _dynamo(net: nn.Module, x: Tensor, opset: int) -> onnx.ModelProto:
    if x.shape[0] < 2:  # a batch of 1 makes torch.export specialise the dimension
        x = x[:1].expand(2, *x.shape[1:]).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (x,), dynamo=True, input_names=["input"], output_names=["output"],
            dynamic_axes=_AXES, opset_version=opset, external_data=False, verbose=False,
        )  # fmt: skip
    return program.model_proto


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
    net: nn.Module, example: Tensor, opset: int, exporter: str = "torchscript"
) -> tuple[onnx.ModelProto, str]:
    """(ModelProto, exporter used). Tries ``exporter`` first, then the other one.

    Input is named 'input' with dynamic dim 0 ('batch'); the first output 'output'.
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
