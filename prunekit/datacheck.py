"""Checks of data arrays before any conversion, split or compute (one DataError line each).

Arrays are numeric (no strings, bytes or objects), have a first axis of examples and are
finite as float32; the training split has >= MIN_TRAIN_ROWS rows and the validation split
>= MIN_VAL_ROWS; x_val/y_val come together and match x/y per example (y_val is y's kind of
target); class labels are >= 0. Messages name the array and use the data's own indices.
Labels below the model's number of outputs are checked by ``datafit.check_data_fits``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prunekit.errors import DataError, PrunekitError, first_line

MIN_TRAIN_ROWS = 2  # fine-tuning and the fit check run on batches of two examples
MIN_VAL_ROWS = 1  # validation metrics need one example


def kind_of(y: np.ndarray) -> str:
    """Data kind of targets y: 'classification' for a 1-D integer array (class labels),
    else 'regression' (floats, even whole-numbered ones, and targets with more than one
    value per example)."""
    return "classification" if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else "regression"


_NOT_NUMBERS = {
    "U": "strings", "S": "bytes", "O": "Python objects", "c": "complex numbers",
    "V": "raw records", "M": "dates", "m": "time deltas",
}  # fmt: skip


def _as_array(value, label: str, name: str) -> np.ndarray:
    """``value`` (array, tensor, list) as a numeric numpy array with a first axis of
    examples; a CPU tensor is viewed, not copied. DataError naming ``label`` otherwise."""
    try:
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            value = value.float() if value.dtype == torch.bfloat16 else value  # numpy lacks it
            return _numeric(value.numpy(), label, name)
        return _numeric(np.asarray(value), label, name)
    except PrunekitError:
        raise
    except Exception as exc:  # ragged nested lists and the like
        raise DataError(f"data {name!r}: {label} is not an array ({first_line(exc)})") from exc


def _numeric(a: np.ndarray, label: str, name: str) -> np.ndarray:
    if a.dtype.kind in _NOT_NUMBERS:
        raise DataError(
            f"data {name!r}: {label} holds {_NOT_NUMBERS[a.dtype.kind]} (dtype {a.dtype}); "
            "inputs and targets must be numeric arrays (integer, float or bool)"
        )
    if a.ndim == 0:
        raise DataError(
            f"data {name!r}: {label} is a single value; arrays need a first axis of examples"
        )
    return a


def _check_finite(a: np.ndarray, label: str, name: str) -> None:
    """NaN/inf (as float32, the dtype the data is used in) -> DataError with count and index."""
    if a.dtype.kind != "f":
        return
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 -> inf
        bad = ~np.isfinite(a.astype(np.float32, copy=False))
    count = int(np.count_nonzero(bad))
    if count:
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), a.shape)
        index = int(first[0]) if a.ndim == 1 else tuple(int(i) for i in first)
        raise DataError(
            f"data {name!r}: {label} holds {count:,} non-finite value{'s' * (count > 1)} (NaN "
            f"or inf as float32), the first at index {index}; inputs and targets must be finite"
        )


def _check_labels(y: np.ndarray, label: str, name: str) -> None:
    """Class labels are >= 0 (their upper end is the model's: see check_data_fits)."""
    negative = np.flatnonzero(y < 0)
    if negative.size:
        i = int(negative[0])
        raise DataError(
            f"data {name!r}: {label} holds {negative.size:,} negative class label"
            f"{'s' * (negative.size > 1)}, the first {int(y[i])} at index {i}; class labels "
            "are integers 0..C-1 for a model with C outputs"
        )


def rows(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _check_rows(x, y, name: str, part: str) -> None:
    sizes = {k: len(v) for k, v in x.items()} if isinstance(x, dict) else {"x": len(x)}
    if y is not None:
        sizes["y"] = len(y)
    if len(set(sizes.values())) != 1:
        raise DataError(f"data {name!r}: {part} arrays need equal lengths, got {sizes}")


def val_rows(n: int, val_fraction: float) -> int:
    return max(1, int(round(n * val_fraction)))


def _check_counts(x, x_val, name: str, val_fraction: float) -> None:
    """Training split >= MIN_TRAIN_ROWS rows, validation >= MIN_VAL_ROWS (split or given)."""
    n = rows(x)
    if x_val is not None:
        counts = {"training": (n, MIN_TRAIN_ROWS), "validation": (rows(x_val), MIN_VAL_ROWS)}
        for part, (have, need) in counts.items():
            if have < need:
                raise DataError(
                    f"data {name!r}: the {part} arrays have {have} row{'s' * (have != 1)}; "
                    f"{part} needs at least {need}"
                )
        return
    if n - val_rows(n, val_fraction) < MIN_TRAIN_ROWS:
        fits = (k for k in range(3, 10**6) if k - val_rows(k, val_fraction) >= MIN_TRAIN_ROWS)
        need = next(fits, None)  # None: val_fraction so close to 1 that no small n fits
        raise DataError(
            f"data {name!r} has {n} row{'s' * (n != 1)}; splitting it into training (>= "
            f"{MIN_TRAIN_ROWS} rows) and validation (>= {MIN_VAL_ROWS}) needs "
            + (f"at least {need}" if need else f"more rows or a val_fraction below {val_fraction}")
        )


def _labelled(x, suffix: str) -> list[tuple[str, np.ndarray]]:
    """(name, array) of inputs: 'x'/'x_val', or each named input ('input_ids_val')."""
    if isinstance(x, dict):
        return [(f"{k}{suffix}", v) for k, v in x.items()]
    return [(f"x{suffix}", x)]


def _check_pairing(y, x_val, y_val, name: str) -> None:
    """x_val and y_val come together (y_val only with y); nothing is dropped silently."""
    if y_val is not None and (y is None or x_val is None):
        lacking = "y" if y is None else "x_val"
        raise DataError(f"data {name!r} has y_val but no {lacking}; give x_val with y_val")
    if x_val is not None and y is not None and y_val is None:
        raise DataError(
            f"data {name!r} has x_val but no y_val for it; give both, or neither (a seeded "
            "split of x, y)"
        )


def _check_val_like_train(x, y, x_val, y_val, name: str) -> None:
    """Validation inputs match the training ones per example; y_val is y's kind of target."""
    if isinstance(x, dict) != isinstance(x_val, dict) or (
        isinstance(x, dict) and set(x) != set(x_val)
    ):
        raise DataError(f"data {name!r}: validation inputs are not the same arrays as training")
    for (label, a), (label_val, b) in zip(_labelled(x, ""), _labelled(x_val, "_val"), strict=True):
        free = isinstance(x, dict) and a.ndim >= 2  # named inputs: dim 1 may be a sequence
        same = a.ndim == b.ndim and a.shape[1 + free :] == b.shape[1 + free :]
        if not same:
            raise DataError(
                f"data {name!r}: {label_val} has examples of shape {b.shape[1:]} but {label} "
                f"has {a.shape[1:]}; validation examples must have the training shape"
            )
    if y is None:
        return
    kinds = (kind_of(y), kind_of(y_val))
    if kinds[0] != kinds[1] or (kinds[0] == "regression" and y.shape[1:] != y_val.shape[1:]):
        desc = [
            "integer class labels" if k == "classification" else f"{a.dtype} targets of shape "
            f"{a.shape[1:]}" for k, a in zip(kinds, (y, y_val), strict=True)
        ]  # fmt: skip
        raise DataError(
            f"data {name!r}: y_val holds {desc[1]} but y holds {desc[0]}; both must be "
            "integer class labels (N,) or float targets of one shape"
        )


def checked_arrays(x, y, x_val, y_val, name: str, val_fraction: float) -> tuple:
    """The four parts as numpy arrays (inputs may be dicts of them), checked as the module
    docstring says, before any conversion, split or compute; indices in messages are the
    data's own."""

    def arrays(v, label):
        """Numeric numpy array(s) of one part; dict inputs keep their names."""
        if v is None or not isinstance(v, dict):
            return None if v is None else _as_array(v, label, name)
        return {k: _as_array(a, f"{k}{label[1:]}", name) for k, a in v.items()}

    if isinstance(y, dict) or isinstance(y_val, dict):
        raise DataError(
            f"data {name!r}: targets are a dict; y must be one array (integer class labels "
            "or float targets); give a --task for structured targets"
        )
    x, x_val = arrays(x, "x"), arrays(x_val, "x_val")
    y, y_val = arrays(y, "y"), arrays(y_val, "y_val")
    if isinstance(x, dict) and not x:
        raise DataError(f"data {name!r} holds no input arrays")
    _check_pairing(y, x_val, y_val, name)
    _check_rows(x, y, name, "training")
    if x_val is not None:
        _check_rows(x_val, y_val, name, "validation")
        _check_val_like_train(x, y, x_val, y_val, name)
    _check_counts(x, x_val, name, val_fraction)
    named = _labelled(x, "") + (_labelled(x_val, "_val") if x_val is not None else [])
    named += [(k, v) for k, v in (("y", y), ("y_val", y_val)) if v is not None]
    for label, a in named:
        _check_finite(a, label, name)
    if y is not None and kind_of(y) == "classification":
        _check_labels(y, "y", name)
        if y_val is not None:
            _check_labels(y_val, "y_val", name)
    return x, y, x_val, y_val
