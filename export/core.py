"""export_onnx: cleanup, export, storage rewrite, verification, receipt."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper
from torch import Tensor, nn

from prunekit.errors import ModelError, RunDirError, SettingError
from prunekit.prune.masks import masks_from_weights
from prunekit.types import call_model

from . import cleanup as clean
from . import int8 as int8_export
from .axes import Axes, check_asked, parse_dynamic_axes
from .exporters import (
    DEFAULT_OPSET,
    Example,
    Exported,
    Forward,
    as_example,
    export_proto,
    graph_inputs,
    opset_of,
)
from .graph import apply_storage, decoded_value
from .lengths import other_length_parity, plan_axes, settle
from .match import count_pruned, float_params, match_initializers
from .modes import DEFAULT_MAX_ACCURACY_DROP, INT8_COMPUTE, check_accuracy_drop
from .receipt import INT8_NOTE, MEMORY_NOTE, exporter_log_path, size_warning
from .storage import check_modes, check_opset
from .verify import check, check_weights, latencies, parity, session

_UMASK = os.umask(0)
os.umask(_UMASK)

log = logging.getLogger(__name__)

# as prune/targets.py: recurrent layers and the single-step cells a model loops over time
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def default_targets(net: nn.Module) -> list[str]:
    """Names of prunable weights: Linear/Conv weights and recurrent weight_ih*/weight_hh*
    (nn.LSTM/GRU/RNN and their cells)."""
    names = []
    for mod_name, mod in net.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, clean.LAYERS) and p_name == "weight":
                names.append(full)
            elif isinstance(mod, _RECURRENT) and p_name.startswith(("weight_ih", "weight_hh")):
                names.append(full)
    return names


def _check_path(path: Path, overwrite: bool, log_path: Path) -> None:
    if not path.parent.is_dir():
        raise RunDirError(f"output directory {str(path.parent)!r} does not exist; create it first")
    if not log_path.parent.is_dir():
        raise RunDirError(f"log directory {str(log_path.parent)!r} does not exist; create it first")
    for out in (path, log_path):
        if out.exists() and not overwrite:
            raise RunDirError(f"{str(out)!r} already exists; pass overwrite=True (--overwrite)")


def _write_log(text: str, log_path: Path) -> str | None:
    """Write the exporters' output atomically to ``log_path`` (str path), or, when they
    printed nothing, remove an earlier export's log there (None)."""
    if not text:
        log_path.unlink(missing_ok=True)
        return None
    fd, tmp = tempfile.mkstemp(dir=log_path.parent, prefix=f".{log_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, log_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(log_path)


def _masks(net: nn.Module, masks: dict | None) -> dict[str, Tensor]:
    params = dict(net.named_parameters())
    if masks is None:
        return masks_from_weights({n: params[n] for n in default_targets(net)})
    out = {}
    for name, mask in masks.items():
        if name not in params or tuple(mask.shape) != tuple(params[name].shape):
            raise ModelError(
                f"mask {name!r} fits no parameter of the model (shape {tuple(mask.shape)}); "
                f"parameters: {sorted(params)[:8]}..."
            )
        out[name] = mask.detach().bool().cpu()
    return out


def _prepare(model: nn.Module, masks: dict | None, do_cleanup: bool) -> tuple:
    """(reference pruned copy, cleaned export copy, cleaned masks, cleanup record)."""
    ref = copy.deepcopy(model).cpu().eval()
    ref_masks = _masks(ref, masks)
    clean.bake_masks(ref, ref_masks)
    net = copy.deepcopy(ref)
    net_masks = {n: m.clone() for n, m in ref_masks.items()}
    record = {"actions": [], "skipped": [], "params_before": float_params(ref)}
    if do_cleanup:
        for act, skip in (clean.fold_batchnorm(net), clean.remove_dead_units(net, net_masks)):
            record["actions"] += act
            record["skipped"] += skip
    else:
        record["skipped"].append("cleanup disabled (cleanup=False)")
    record["params_after"] = float_params(net)
    return ref, net, net_masks, record


@dataclass
class _Built:
    """The export before it is written: dense and stored protos, tensor rows, expected
    decoded weights, unmatched weights, what the exporter made and the dynamic axes."""

    dense: onnx.ModelProto
    stored: onnx.ModelProto
    rows: list
    expected: dict
    missing: list
    exported: Exported
    axes: Axes


def _build(net, masks, example, modes: tuple, exporter: str, plan: tuple) -> _Built:
    """Export (axes settled at another length), rewrite the storage, expect the weights.

    modes: (storage, quantize, opset); plan: (axes, ref, call, verification inputs)."""
    storage, quantize, opset = modes
    axes, ref, call, inputs = plan

    def export(axes_now: Axes) -> Exported:
        return export_proto(net, example, opset, exporter, axes_now.dims, call)

    exported, axes = settle(export, axes, ref, call, example, inputs)
    dense = exported.proto
    check_opset(opset_of(dense), storage, quantize)
    candidates, missing = match_initializers(dense, net, count_pruned(masks))
    stored = onnx.ModelProto()
    stored.CopyFrom(dense)
    rows = apply_storage(stored, candidates, storage, quantize)
    inits = {t.name: t for t in dense.graph.initializer}
    expected = {
        c.onnx_name: (
            decoded_value(numpy_helper.to_array(inits[c.onnx_name]), r["stored_as"], c.axis),
            c.pruned,
        )
        for c, r in zip(candidates, rows, strict=True)
    }
    return _Built(dense, stored, rows, expected, missing, exported, axes)


def _examples(
    model: nn.Module, example_input, verify_inputs, keywords: bool = True
) -> tuple[Example, Example]:
    """(example, verification inputs), checked; the latter defaults to the former and must
    have the same form (tensor, or dict with the same keys). keywords: the model takes a
    dict's entries as keyword arguments (no ``forward`` mapping given)."""
    example = as_example(model, example_input, keywords=keywords)
    if verify_inputs is None:
        return example, example
    inputs = as_example(model, verify_inputs, "verify_inputs", keywords=keywords)
    if isinstance(example, dict) != isinstance(inputs, dict) or (
        isinstance(example, dict) and set(example) != set(inputs)
    ):
        want = f"a dict with keys {', '.join(example)}" if isinstance(example, dict) else "a tensor"
        raise SettingError(f"verify_inputs must be like example_input: {want}")
    return example, inputs


def _drop_limit(value, compute: bool) -> float | None:
    """The checked accuracy-drop limit in points: int8 compute defaults to
    DEFAULT_MAX_ACCURACY_DROP, other modes to None (no limit)."""
    if value is None and not compute:
        return None
    return check_accuracy_drop(DEFAULT_MAX_ACCURACY_DROP if value is None else value)


def _verifier(built: _Built, checks: tuple, example, quantized: bool, limit: float | None):
    """verify(tmp) -> (verification, session seconds) of an fp32-compute export: checker,
    parity with PyTorch (1e-5; int8-weights: the accuracy change vs ``limit`` points), the
    other length, the decoded weights. checks: (ref, call, inputs, targets)."""
    ref, call, inputs, targets = checks

    def verify(tmp: str) -> tuple[dict, float]:
        written = onnx.load(tmp)
        result = {"checker": check(written)}
        sess, created = session(tmp)
        result.update(parity(sess, ref, inputs, targets, quantized, limit, call))
        if built.axes.groups():
            result["other_length"] = other_length_parity(
                sess, ref, call, built.axes, example, inputs, quantized
            )
        result["weights"] = check_weights(written, expected=built.expected)
        return result, created

    return verify


def _write_verified(stored, path: Path, verify_fn) -> tuple[dict, float]:
    """Save to a temp file beside ``path``, verify it, then rename; nothing left on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(stored, tmp)
        result, created = verify_fn(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result, created


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Example,
    storage: str = "packed",
    quantize: str | None = None,
    opset: int | None = None,
    masks: dict[str, Tensor] | None = None,
    verify_inputs: Example | None = None,
    verify_targets: Tensor | None = None,
    cleanup: bool = True,
    latency: bool = True,
    *,
    exporter: str = "torchscript",
    overwrite: bool = True,
    max_accuracy_drop: float | None = None,
    log_path: str | os.PathLike | None = None,
    forward: Forward | None = None,
    dynamic_axes=None,
    infer_from: Example | None = None,
    calibration_inputs: Example | None = None,
    seed: int = 0,
) -> dict:
    """Export a pruned model to ONNX at ``path``, verify it, and return the receipt.

    model: any nn.Module (left untouched; a CPU eval copy is exported). example_input:
    a tensor [N, ...] whose dim 0 is the batch (graph input 'input'), or a dict name ->
    tensor [N, ...] (graph inputs named after the keys in the dict's order, dtypes kept).
    forward: how the model is fed the inputs, ``forward(model, inputs) -> outputs`` (a
    task's argument mapping, e.g. ``lambda m, x: m(x['ids'], x['mask'])``); the graph
    takes exactly the example's tensors. None: a tensor positionally, a dict as keyword
    arguments (its keys must be arguments of ``model.forward``). dynamic_axes: ``NAME:DIM``
    strings (or (name, dim) pairs) of input axes besides the batch that may change length
    (audio samples, sequence steps); others are inferred (token ids and masks of a dict,
    and axes along which the examples of ``infer_from``, default the verification inputs,
    are padded to different lengths; see export.axes) and kept only where the model runs
    at another length. Parity is also verified at another length than the example's.
    masks: parameter name -> bool tensor (True = keep); None reads them off the zeros of
    the default targets. storage: one of STORAGE_MODES; quantize: None or one of
    QUANTIZE_MODES (packed storage only): 'int8' / 'int8-dynamic' / 'int8-static' compute in
    int8 (export/quantize.py, verified by export/int8.py against the fp32 graph, which holds
    the exact parity check), 'int8-weights' stores int8 values decoded to fp32; opset: ONNX
    opset (default 18), within SUPPORTED_OPSETS and the storage mode's
    minimum, written exactly. verify_inputs/verify_targets: [N, ...] inputs of the same
    form as example_input (default: example_input) and class indices [N] for the int8
    accuracy change. max_accuracy_drop: points of validation accuracy (or 100 x cosine to
    the fp32 outputs, for a model without labels) an int8 export may lose; int8 compute
    default 1.0, int8-weights default no limit; past it QuantizationRefused (exit 2) and
    nothing is written. calibration_inputs: [N, ...] examples (the training inputs) the
    static method draws 256 calibration examples from with ``seed`` (default: the
    verification inputs). cleanup: fold BatchNorm and remove dead units first. latency: time
    onnxruntime and PyTorch at batch 1 and 64 (ms). exporter: tried first ('torchscript'
    or 'dynamo'); the other is the fallback, whose reason is logged as one warning.
    log_path: where everything the exporters printed goes (default ``<path>.log``; written
    only when they printed something, named in the receipt as ``exporter_log``). A file
    larger than the dense export is one logged warning, also in the receipt's
    ``warnings``. Raises SettingError/RunDirError/ModelError (exit 2) before writing
    anything, or VerificationError (exit 1) after verification fails; on failure no file
    is at ``path``.
    """
    start = time.perf_counter()
    opset = DEFAULT_OPSET if opset is None else opset
    check_modes(storage, quantize, opset)  # before any export work: one line, nothing written
    compute = quantize in INT8_COMPUTE
    max_accuracy_drop = _drop_limit(max_accuracy_drop, compute)
    opset, asked = int(opset), parse_dynamic_axes(dynamic_axes)  # opset: checked whole above
    path = Path(path)
    log_path = exporter_log_path(path) if log_path is None else Path(log_path)
    _check_path(path, overwrite, log_path)
    example, inputs = _examples(model, example_input, verify_inputs, forward is None)
    check_asked(asked, example)
    ref, net, net_masks, record = _prepare(model, masks, cleanup)
    call = forward or call_model
    source = inputs if infer_from is None else as_example(model, infer_from, "infer_from", False)
    axes = plan_axes(ref, call, example, source, asked)
    graph_modes = ("dense", None, opset) if compute else (storage, quantize, opset)
    built = _build(net, net_masks, example, graph_modes, exporter, (axes, ref, call, inputs))
    checks = (ref, call, inputs, verify_targets)
    if compute:  # the fp32 graph passes exact parity, then its int8 version is verified
        calibration = (inputs, seed, "validation inputs")
        if calibration_inputs is not None:
            calibration = (calibration_inputs, seed, "training inputs")
        built, quant = int8_export.quantize_built(built, quantize, storage, checks, calibration)
        verify = int8_export.verifier(built, quant, checks, example, max_accuracy_drop)
    else:
        verify = _verifier(built, checks, example, quantize is not None, max_accuracy_drop)
    verification, created = _write_verified(built.stored, path, verify)
    receipt = _receipt(path, built, (storage, quantize), record, log_path)
    receipt.update(verification=verification, session_creation_s=created)
    if latency:
        receipt["latency"] = _latency(path, built.dense, storage, ref, example, call)
    if compute:
        receipt["quantization"] = _quantization(receipt, built, quant)
    receipt["seconds"] = time.perf_counter() - start
    return receipt


def _receipt(path: Path, built: _Built, modes: tuple, record: dict, log_path: Path) -> dict:
    """The receipt of a written export (verification and latency added by the caller); logs
    the fallback and a file larger than the dense export as one warning each."""
    storage, quantize = modes
    exported = built.exported
    written_log = _write_log(exported.log, log_path)
    if exported.fallback:
        log.warning(
            "exported with %s: %s%s", exported.exporter, exported.fallback,
            f"; exporter output in {written_log}" if written_log else "",
        )  # fmt: skip
    size, dense_fp32 = path.stat().st_size, 4 * record["params_before"]
    sizes = {"file": size, "dense_onnx": built.dense.ByteSize(), "dense_fp32": dense_fp32}
    warning = None  # int8 compute: the receipt's quantization.bytes compares with fp32
    if quantize not in INT8_COMPUTE:
        warning = size_warning(path.name, sizes, storage, *_graph_bytes(built.stored))
    if warning:
        log.warning("%s", warning)
    log.info("exported %s (%s, %.4fx dense fp32)", path, storage, size / dense_fp32)
    return {
        "path": str(path), "storage": storage, "quantize": quantize,
        "exporter": exported.exporter, "exporter_fallback": exported.fallback,
        "exporter_log": written_log, "opset": opset_of(built.stored),
        "inputs": graph_inputs(built.stored),
        "dynamic_axes": {"asked": built.axes.specs(built.axes.asked),
                         "inferred": built.axes.specs(built.axes.inferred)},
        "bytes": {**sizes, "ratio": size / dense_fp32}, "warnings": [warning] if warning else [],
        "tensors": built.rows, "unmatched_weights": built.missing, "cleanup": record,
        "memory_note": INT8_NOTE if quantize in INT8_COMPUTE else MEMORY_NOTE,
    }  # fmt: skip


def _quantization(receipt: dict, built: _Built, quant: dict) -> dict:
    """The receipt's int8 section: method, int8 ops, calibration, the fp32 vs int8 metric
    (verification['int8']), file sizes and latency ratios (int8 file / fp32 dense graph)."""
    keep = ("mode", "method", "integer_ops", "left_fp32", "calibration")
    out = {k: quant[k] for k in keep}
    out.update(receipt["verification"]["int8"])
    out["bytes"] = {"fp32_onnx": built.dense.ByteSize(), "int8_file": receipt["bytes"]["file"]}
    if receipt.get("latency"):
        out["latency_ratio"] = int8_export.latency_ratio(receipt["latency"], receipt["storage"])
    return out


def _graph_bytes(proto: onnx.ModelProto) -> tuple[int, int]:
    """(bytes of ``proto`` that are not initializers: nodes, attributes, constants, names;
    the most nodes that read one initializer: a loop unrolled N times reads its weights N
    times)."""
    graph = proto.graph
    weights = sum(t.ByteSize() for t in graph.initializer)
    weights += sum(t.ByteSize() for t in graph.sparse_initializer)
    names = {t.name for t in graph.initializer}
    reads = Counter(name for node in graph.node for name in node.input if name in names)
    return proto.ByteSize() - weights, max(reads.values(), default=1)


def _latency(path: Path, dense: onnx.ModelProto, storage: str, ref, example, call) -> dict:
    """Latency of the written file, of the dense ONNX of the same graph, and of PyTorch."""
    sessions = {f"onnxruntime_{storage}": session(str(path))[0]}
    if storage != "dense":
        sessions["onnxruntime_dense"] = session(dense.SerializeToString())[0]
    return latencies(sessions, ref, example, call=call)
