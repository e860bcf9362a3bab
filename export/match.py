"""Find the graph initializers that hold the model's pruned weights, by value.

Exporters rename, fold and transpose weights, so names are useless. For each masked
parameter we compute the layouts an exporter may emit (as is; transposed, for MatMul; the
ONNX gate order of LSTM/GRU weights with a leading direction axis) and look for an
initializer with exactly those bytes.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from .graph import Candidate

log = logging.getLogger(__name__)

# torch gate order -> ONNX gate order, as chunk indices along dim 0
_GATES = {nn.LSTM: (0, 3, 1, 2), nn.GRU: (1, 0, 2)}  # LSTM ifgo -> iofc ; GRU rzn -> zrn


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def layouts(param: Tensor, module: nn.Module) -> list[tuple[np.ndarray, int]]:
    """Candidate ONNX layouts of ``param`` as (array, output-channel axis in that layout)."""
    w = param.detach().cpu().numpy()
    out = [(w, 0)]
    if w.ndim == 2:
        out.append((np.ascontiguousarray(w.T), 1))
    gates = next((g for cls, g in _GATES.items() if isinstance(module, cls)), None)
    if gates is not None and w.ndim == 2:
        chunks = np.split(w, len(gates), axis=0)
        out.append((np.concatenate([chunks[i] for i in gates])[None], 1))
    return out


def match_initializers(
    model: onnx.ModelProto, net: nn.Module, pruned: dict[str, int]
) -> tuple[list[Candidate], list[str]]:
    """(candidates, names of masked parameters found nowhere in the graph).

    pruned: parameter name -> number of pruned (mask False) entries. Each initializer is
    claimed at most once; an initializer whose values match several parameters (e.g. two
    all-zero tensors) goes to the first.
    """
    by_key: dict[tuple, list[str]] = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        by_key.setdefault((arr.shape, _digest(arr)), []).append(init.name)
    modules = dict(net.named_modules())
    params = dict(net.named_parameters())
    claimed: set[str] = set()
    found, missing = [], []
    for name, n_pruned in pruned.items():
        module = modules[name.rpartition(".")[0]]
        hit = None
        for arr, axis in layouts(params[name], module):
            names = by_key.get((arr.shape, _digest(arr.astype(np.float32))), [])
            free = [n for n in names if n not in claimed]
            if free:
                hit = Candidate(free[0], name, axis, n_pruned)
                break
        if hit is None:
            missing.append(name)
            continue
        claimed.add(hit.onnx_name)
        found.append(hit)
    if missing:
        log.info("weights not found in the ONNX graph (stored as exported): %s", missing)
    return found, missing


def count_pruned(masks: dict[str, Tensor]) -> dict[str, int]:
    """Parameter name -> number of False entries of its mask."""
    return {n: int((~m.bool()).sum()) for n, m in masks.items()}


def float_params(net: nn.Module) -> int:
    """Number of parameter entries of ``net`` (for the dense fp32 byte count)."""
    return sum(p.numel() for p in net.parameters() if torch.is_floating_point(p))
