"""export_onnx: cleanup, export, storage rewrite, verification, receipt."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path

import onnx
from onnx import numpy_helper
from torch import Tensor, nn

from prunekit.errors import ModelError, RunDirError, SettingError
from prunekit.prune.masks import masks_from_weights

from . import cleanup as clean
from .exporters import DEFAULT_OPSET, Example, as_example, export_proto, graph_inputs, opset_of
from .graph import apply_storage, decoded_value
from .match import count_pruned, float_params, match_initializers
from .receipt import MEMORY_NOTE
from .storage import check_modes, check_opset
from .verify import check, check_weights, latencies, parity, session

_UMASK = os.umask(0)
os.umask(_UMASK)

log = logging.getLogger(__name__)

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def default_targets(net: nn.Module) -> list[str]:
    """Names of prunable weights: Linear/Conv weights and recurrent weight_ih*/weight_hh*."""
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


def exporter_log_path(path: str | os.PathLike) -> Path:
    """Where export_onnx writes what the exporters printed by default: ``<path>.log``."""
    path = Path(path)
    return path.with_name(path.name + ".log")


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


def _build(net, masks, example, storage, quantize, opset, exporter) -> tuple:
    """(dense proto, stored proto, tensor rows, expected decoded weights, missing,
    exporters.Exported)."""
    exported = export_proto(net, example, opset, exporter)
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
    return dense, stored, rows, expected, missing, exported


def _examples(model: nn.Module, example_input, verify_inputs) -> tuple[Example, Example]:
    """(example, verification inputs), checked; the latter defaults to the former and must
    have the same form (tensor, or dict with the same keys)."""
    example = as_example(model, example_input)
    if verify_inputs is None:
        return example, example
    inputs = as_example(model, verify_inputs, "verify_inputs")
    if isinstance(example, dict) != isinstance(inputs, dict) or (
        isinstance(example, dict) and set(example) != set(inputs)
    ):
        want = f"a dict with keys {', '.join(example)}" if isinstance(example, dict) else "a tensor"
        raise SettingError(f"verify_inputs must be like example_input: {want}")
    return example, inputs


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
) -> dict:
    """Export a pruned model to ONNX at ``path``, verify it, and return the receipt.

    model: any nn.Module (left untouched; a CPU eval copy is exported). example_input:
    a tensor [N, ...] whose dim 0 is the batch (graph input 'input', dim 0 dynamic), or a
    dict name -> tensor [N, ...] passed as ``model(**example_input)`` (graph inputs named
    after the keys in the dict's order, dtypes kept; dim 0 dynamic 'batch', dim 1 dynamic
    'sequence' for integer/bool inputs of rank >= 2 and float ones of the same length;
    see exporters.input_axes). masks: parameter name
    -> bool tensor (True = keep); None reads them off the zeros of the default targets.
    storage: one of STORAGE_MODES; quantize: None or 'int8' (packed only); opset: ONNX opset
    (default 18), within exporters.SUPPORTED_OPSETS and the storage mode's minimum, and
    written exactly (never replaced by another). verify_inputs/verify_targets: [N, ...]
    inputs of the same form as example_input (a dict with the same keys; default:
    example_input) and class indices [N] for the int8 accuracy change. cleanup: fold
    BatchNorm and remove dead units first. latency: time onnxruntime and PyTorch at batch
    1 and 64 (ms). exporter: tried first ('torchscript' or 'dynamo'); the other is the
    fallback, whose reason is logged as one warning. log_path: where everything the
    exporters printed goes (default ``<path>.log``; written only when they printed
    something, named in the receipt as ``exporter_log``); nothing reaches the terminal.
    Raises SettingError/RunDirError/ModelError (exit 2) before writing anything, or
    VerificationError (exit 1) after verification fails; on failure no file is at ``path``.
    """
    start = time.perf_counter()
    opset = DEFAULT_OPSET if opset is None else opset
    check_modes(storage, quantize, opset)  # before any export work: one line, nothing written
    opset = int(opset)  # a numpy integer, checked whole above
    path = Path(path)
    log_path = exporter_log_path(path) if log_path is None else Path(log_path)
    _check_path(path, overwrite, log_path)
    example, inputs = _examples(model, example_input, verify_inputs)
    ref, net, net_masks, record = _prepare(model, masks, cleanup)
    dense, stored, rows, expected, missing, exported = _build(
        net, net_masks, example, storage, quantize, opset, exporter
    )

    def verify(tmp: str) -> tuple[dict, float]:
        written = onnx.load(tmp)
        result = {"checker": check(written)}
        sess, created = session(tmp)
        result.update(
            parity(sess, ref, inputs, verify_targets, quantize is not None, max_accuracy_drop)
        )
        result["weights"] = check_weights(written, expected)
        return result, created

    verification, created = _write_verified(stored, path, verify)
    written_log = _write_log(exported.log, log_path)
    if exported.fallback:
        log.warning(
            "exported with %s: %s%s", exported.exporter, exported.fallback,
            f"; exporter output in {written_log}" if written_log else "",
        )  # fmt: skip
    size = path.stat().st_size
    dense_bytes = 4 * record["params_before"]
    receipt = {
        "path": str(path), "storage": storage, "quantize": quantize,
        "exporter": exported.exporter, "exporter_fallback": exported.fallback,
        "exporter_log": written_log, "opset": opset_of(stored), "inputs": graph_inputs(stored),
        "bytes": {"file": size, "dense_fp32": dense_bytes, "ratio": size / dense_bytes},
        "tensors": rows, "unmatched_weights": missing, "cleanup": record,
        "verification": verification, "session_creation_s": created, "memory_note": MEMORY_NOTE,
    }  # fmt: skip
    if latency:
        receipt["latency"] = _latency(path, dense, storage, ref, example)
    receipt["seconds"] = time.perf_counter() - start
    log.info("exported %s (%s, %.4fx dense fp32)", path, storage, size / dense_bytes)
    return receipt


def _latency(path: Path, dense: onnx.ModelProto, storage: str, ref, example) -> dict:
    """Latency of the written file, of the dense ONNX of the same graph, and of PyTorch."""
    sessions = {f"onnxruntime_{storage}": session(str(path))[0]}
    if storage != "dense":
        sessions["onnxruntime_dense"] = session(dense.SerializeToString())[0]
    return latencies(sessions, ref, example)
