"""Storage modes for pruned weights inside an ONNX graph.

``dense`` keeps every initializer as exported. ``sparse`` moves a weight into
``graph.sparse_initializer`` (values + INT64 linear indices) when that is smaller than dense;
onnxruntime densifies it at load, so it saves disk only. ``packed`` stores a weight as uint8
index deltas plus its non-zero values and decodes it in-graph::

    Cast(deltas -> int64) -> CumSum -> positions
    ConstantOfShape(numel) -> zeros ; ScatterElements(zeros, positions, values) -> Reshape

Every input of that subgraph is a constant, so onnxruntime constant-folds it back into the
dense weight when the session is created: the file is small and inference runs the same
dense kernels. With ``quantize='int8-weights'`` (storage only) the packed values are int8
and the reshaped tensor goes through a per-output-channel DequantizeLinear (symmetric, zero
point 0, so pruned zeros stay exactly zero).
"""

from __future__ import annotations

import numpy as np

from .modes import (  # noqa: F401 - re-exported: these names lived here
    MIN_OPSET,
    QUANT_STORAGE,
    QUANTIZE_MODES,
    STORAGE_MODES,
    check_modes,
    check_opset,
)

MAX_DELTA = 255  # uint8


def pack(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode a 1-D array as (uint8 deltas, values), both of length m >= nnz.

    Positions of the stored entries are ``cumsum(deltas)`` (the first delta is the first
    position itself, so it may be 0). A gap larger than 255 is bridged by filler entries
    with delta 255 and value 0; they land strictly between two non-zeros, on positions
    that are zero anyway, so no position repeats. An all-zero input gives empty arrays.
    """
    flat = np.asarray(flat).ravel()
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return np.zeros(0, np.uint8), np.zeros(0, flat.dtype)
    gaps = np.diff(pos, prepend=0)
    gaps[0] = pos[0]
    # entries per gap: ceil(gap / 255), at least one (the first gap may be 0)
    counts = np.where(gaps > 0, (gaps - 1) // MAX_DELTA + 1, 1)
    last = np.cumsum(counts) - 1
    deltas = np.full(int(counts.sum()), MAX_DELTA, dtype=np.int64)
    deltas[last] = gaps - MAX_DELTA * (counts - 1)
    values = np.zeros(deltas.size, dtype=flat.dtype)
    values[last] = flat[pos]
    return deltas.astype(np.uint8), values


def unpack(deltas: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """Reference decoder (numpy) of :func:`pack`: the dense 1-D array of length ``numel``."""
    out = np.zeros(numel, dtype=values.dtype)
    if deltas.size:
        out[np.cumsum(deltas.astype(np.int64))] = values
    return out


def packed_bytes(deltas: np.ndarray, values: np.ndarray) -> int:
    """Payload bytes of a packed tensor (deltas + values, without graph overhead)."""
    return int(deltas.nbytes + values.nbytes)


def sparse_bytes(nnz: int, itemsize: int) -> int:
    """Payload bytes of a SparseTensorProto with INT64 linear indices."""
    return nnz * (itemsize + 8)


def quantize_int8(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: (q int8 like ``array``, scales float32 [array.shape[axis]]).

    scale_c = max|w_c| / 127 (1.0 for an all-zero channel), q = round(w / scale) in
    [-127, 127]; zeros map to exactly 0 and back.
    """
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    amax = np.abs(moved).max(axis=1) if moved.size else np.zeros(array.shape[axis])
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = -1
    q = np.clip(np.rint(array / scales.reshape(shape)), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """Float32 value of ``q * scale`` along ``axis`` (what DequantizeLinear computes)."""
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q.astype(np.float32) * scales.reshape(shape)).astype(np.float32)
