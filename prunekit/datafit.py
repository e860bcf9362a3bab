"""Does the data fit the model and the task? A two-example trial run before any long work.

``check_data_fits`` runs the task's forward (and loss) on two training examples and checks
the outputs against the targets of built-in tasks: labels below the number of outputs,
float targets refused where a classifier needs integer labels. Every failure is one
DataError line; the outputs are checked before the loss runs, so no library warning
precedes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prunekit.errors import DataError, PrunekitError, first_line
from prunekit.types import TASK_KINDS, Task, batch_inputs, batch_to, call_model

if TYPE_CHECKING:
    from prunekit.data import DataBundle, Inputs


def describe_inputs(x: Inputs) -> str:
    """Per-example shapes and dtypes of inputs, e.g. '{input_ids: (16,) int64, ...}'."""
    if isinstance(x, dict):
        inner = ", ".join(f"{k}: {tuple(v.shape[1:])} {str(v.dtype)[6:]}" for k, v in x.items())
        return "{" + inner + "}"
    return f"of shape {tuple(x.shape[1:])}"


def _consume_error(exc: Exception, data: DataBundle, stage: str) -> DataError:
    keys = list(data.x_train) if isinstance(data.x_train, dict) else None
    if isinstance(exc, KeyError):
        where = f"key {exc.args[0]!r} is missing" if exc.args else "a key is missing"
        have = f"the batch has keys {keys}" if keys else "the batch is not a dict"
        return DataError(f"the task's {stage} cannot consume the batch: {where}; {have}")
    if isinstance(exc, IndexError) and ("tuple index" in str(exc) or "list index" in str(exc)):
        return DataError(
            f"the task's {stage} cannot consume the batch: position out of range "
            f"({first_line(exc)}); batches are (inputs, targets) or inputs alone"
        )
    hint = ""
    if keys and isinstance(exc, TypeError) and "keyword argument" in str(exc):
        hint = (
            "; named inputs are passed as model(**batch): for a model called differently "
            "(e.g. model(ids, mask)) give --task module:factory whose forward calls it"
        )
    return DataError(
        f"data {data.name!r} with inputs {describe_inputs(data.x_train)} does not fit the "
        f"model ({stage}): {first_line(exc)}{hint}"
    )


@torch.no_grad()
def check_data_fits(model: nn.Module, data: DataBundle, task: Task | None = None, loss=True):
    """Run ``task`` (default: ``model(inputs)``) on two examples; returns the outputs.

    Raises DataError (one line) naming the missing key, position or shapes when the model
    or the task cannot consume the data, or, for built-in tasks (and ``task=None``), when
    the outputs do not match the targets: a label >= the model's number of outputs, float
    targets y (N,) against a model with several outputs or a classification task. The
    outputs are checked before the loss runs, so no library warning precedes the line.
    loss: also evaluate ``task.loss`` on the batch.
    """
    builtin = task is None or task.kind in TASK_KINDS
    kind = task.kind if task is not None and task.kind in TASK_KINDS else data.kind
    if kind == "classification" and data.kind == "regression":
        raise DataError(_float_labels_message(data, "the classification task"))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = batch_to(data.first_train(2, 2)[0], device)
    try:
        model.eval()
        if task is not None:
            out = _stage(lambda: task.forward(model, batch), data, "forward")
        else:
            out = _stage(lambda: call_model(model, batch_inputs(batch)), data, "forward")
        if builtin:
            _check_outputs(out, data, kind)
        if task is not None and loss:
            _check_loss_value(_stage(lambda: task.loss(out, batch), data, "loss"))
    finally:
        model.train(was_training)
    return out


def _stage(run, data: DataBundle, stage: str):
    """``run()``; any failure but a PrunekitError means the data does not fit model/task."""
    try:
        return run()
    except PrunekitError:
        raise
    except Exception as exc:  # torch raises many types for inputs a model cannot take
        raise _consume_error(exc, data, stage) from exc


def _float_labels_message(data: DataBundle, consumer: str) -> str:
    """Why float targets y are not class labels, and what to do instead."""
    y, y_val = data.y_train, data.y_val
    if y.dim() != 1:
        return (
            f"data {data.name!r} has float targets of shape {tuple(y.shape[1:])} per example "
            f"but {consumer} needs integer class labels, one per example (y of shape (N,))"
        )
    both = torch.cat([y, y_val]) if isinstance(y_val, Tensor) else y
    fractions = both[both != both.round()]
    hint = (
        f"y holds non-integer values such as {float(fractions[0]):g}"
        if fractions.numel()
        else "if y's whole-number values are class labels, save y as integers "
        "(y.astype('int64'))"
    )
    return (
        f"data {data.name!r} has float targets y, one per example, so it is regression data, "
        f"but {consumer} needs integer class labels 0..C-1; {hint}"
    )


def _check_loss_value(value) -> None:
    """A task's loss must be the batch's scalar mean (one floating-point number)."""
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        got = f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else (
            type(value).__name__
        )
        raise DataError(
            f"the task's loss must return a scalar float tensor (the batch mean), got {got}"
        )


def _check_outputs(out, data: DataBundle, kind: str) -> None:
    """Outputs (N, C) against the targets the task of ``kind`` will compare them with."""
    if not isinstance(out, Tensor):
        raise DataError(f"the model returns {type(out).__name__}, not a tensor of outputs")
    if kind == "classification" and (out.dim() != 2 or out.shape[1] < data.num_classes):
        raise DataError(
            f"data {data.name!r} has {data.num_classes} classes but the model outputs shape "
            f"{tuple(out.shape)}; need (N, >= {data.num_classes}){_label_out_of_range(out, data)}"
        )
    if kind != "regression" or tuple(out.shape[1:]) == tuple(data.y_train.shape[1:]):
        return
    if data.y_train.dim() == 1 and out.dim() == 2 and out.shape[1] > 1:
        raise DataError(_float_labels_message(data, f"a model with {out.shape[1]} outputs"))
    raise DataError(
        f"data {data.name!r} has targets of shape {tuple(data.y_train.shape[1:])} but the "
        f"model outputs {tuple(out.shape[1:])} per example"
    )


def _label_out_of_range(out: Tensor, data: DataBundle) -> str:
    """': N labels are >= C (the largest L); valid labels are 0..C-1' for outputs (N, C)."""
    if out.dim() != 2:
        return ""
    outputs = int(out.shape[1])
    labels = torch.cat([data.y_train, data.y_val])
    beyond = int((labels >= outputs).sum())
    return (
        f": {beyond:,} label{'s' * (beyond > 1)} >= {outputs} (the largest {int(labels.max())}); "
        f"valid labels for {outputs} outputs are 0..{outputs - 1}"
    )
