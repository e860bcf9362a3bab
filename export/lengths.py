"""Dynamic lengths, checked: the model must run at another length in PyTorch before the
export, and the exported graph must match it there in onnxruntime after.

An asked axis (``--dynamic-axis NAME:DIM``) that fails either check is refused in one
SettingError line; an inferred one is dropped (the axis stays static) and the export says
nothing: inference is a convenience, never a failure.
"""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from prunekit.errors import (
    ModelError,
    PrunekitError,
    SettingError,
    VerificationError,
    first_line,
)
from prunekit.types import take_rows

from .axes import Axes, group_lengths, items, make_axes, padded_axes, resized, token_axes
from .verify import FP32_TOL, parity, run_onnx, run_torch, session

log = logging.getLogger(__name__)

#: Rows of the verification inputs checked at another length.
ROWS = 64


def _asked_message(axes: Axes, members, what: str) -> str:
    specs = ", ".join(axes.specs(set(members) & axes.asked))
    return f"--dynamic-axis {specs}: {what}"


def plan_axes(ref: nn.Module, call, example, source, asked) -> Axes:
    """The dynamic axes of the export: every batch axis, the ``asked`` (input, axis) pairs,
    and those inferred from ``example`` (token ids, masks) and ``source`` (padded
    sequences); each group must let ``call(ref, x)`` run at another length in PyTorch.

    Raises ModelError when the model cannot run on the example itself (the argument
    mapping does not fit it), SettingError naming an asked axis the model cannot take at
    another length; inferred axes that fail stay static.
    """
    try:
        run_torch(ref, example, call)
    except PrunekitError:
        raise
    except Exception as exc:  # the model's own error, any type
        shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in items(example))
        raise ModelError(
            f"{type(ref).__name__} cannot run on the example inputs ({shapes}): {first_line(exc)}"
        ) from exc
    inferred = token_axes(example) | padded_axes(source)
    axes = make_axes(example, asked, inferred)
    keep = set()
    for dim, members in axes.groups().items():
        lengths = group_lengths(axes, example, example, only=dim)
        try:
            run_torch(ref, resized(example, lengths), call)
        except Exception as exc:  # the model's own error at that length, any type
            if set(members) & axes.asked:
                (name, axis), new = next(iter(lengths.items()))
                size = dict(items(example))[name].shape[axis]
                raise SettingError(
                    _asked_message(
                        axes,
                        members,
                        f"the model does not run at length {new} along that "
                        f"axis (the example has {size}): {first_line(exc)}",
                    )
                ) from exc
            log.debug("axes %s stay static: %s", members, first_line(exc))
            continue
        keep |= set(members)
    return axes.keeping(example, keep)


def _other_inputs(axes: Axes, example, inputs):
    """(the first rows of ``inputs`` resized to another length, dim name -> that length)."""
    lengths = group_lengths(axes, example, inputs)
    shown = {axes.dims[n][a]: new for (n, a), new in lengths.items()}
    return resized(take_rows(inputs, slice(0, ROWS)), lengths), shown


def graph_failure(proto_bytes: bytes, ref, call, axes: Axes, example, inputs) -> str | None:
    """Why the graph ``proto_bytes`` does not match PyTorch at another length (None if it
    does): it fails to run, or its output differs in shape or by more than 1e-5."""
    x, shown = _other_inputs(axes, example, inputs)
    where = ", ".join(f"{d}={n}" for d, n in shown.items())
    try:
        got = run_onnx(session(proto_bytes)[0], x)
        want = run_torch(ref, x, call)
    except Exception as exc:  # onnxruntime's and the model's errors, any type
        return f"at {where}: {first_line(exc)}"
    if got.shape != want.shape:
        return f"at {where} onnxruntime gives shape {got.shape}, PyTorch {want.shape}"
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
    return f"at {where} max abs diff {diff:.3g} > {FP32_TOL:g}" if diff > FP32_TOL else None


def settle(export, axes: Axes, ref, call, example, inputs):
    """(Exported, axes) whose graph follows another length: ``export(axes)`` builds the
    graph; if it fails at another length, inferred axes are dropped and it is built again.

    Raises SettingError when asked axes still fail (the model fixes the length inside the
    graph, e.g. a Python loop over the steps, unrolled by the exporter).
    """
    exported = export(axes)
    if not axes.groups():
        return exported, axes
    failure = graph_failure(exported.proto.SerializeToString(), ref, call, axes, example, inputs)
    if failure and axes.inferred:
        log.debug("inferred dynamic axes dropped: the graph fails %s", failure)
        axes = axes.keeping(example, axes.asked)
        exported = export(axes)
        failure = None
        if axes.groups():
            proto = exported.proto.SerializeToString()
            failure = graph_failure(proto, ref, call, axes, example, inputs)
    if failure:
        raise SettingError(
            _asked_message(
                axes,
                axes.asked,
                f"the exported graph does not follow another length "
                f"({failure}); the model fixes the length inside the graph (e.g. a loop "
                "over the steps, unrolled by the exporter)",
            )
        )
    return exported, axes


def other_length_parity(sess, ref, call, axes: Axes, example, inputs, quantized: bool) -> dict:
    """Parity of the written file at another length than the example's: {'lengths': dim
    name -> length, 'n_inputs', 'max_abs_diff'}; VerificationError if it fails."""
    x, shown = _other_inputs(axes, example, inputs)
    try:
        result = parity(sess, ref, x, None, quantized, None, call)
    except VerificationError as exc:
        where = ", ".join(f"{d}={n}" for d, n in shown.items())
        raise VerificationError(f"at another length ({where}): {exc}") from exc
    return {"lengths": shown, **{k: result[k] for k in ("n_inputs", "max_abs_diff")}}
