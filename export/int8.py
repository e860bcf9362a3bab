"""The int8-compute export: quantize the verified fp32 graph, pack its int8 weights, and
verify the int8 file against the fp32 graph (not against PyTorch to 1e-5, which int8
cannot hold).

Verification of an int8 export, in order:

1. the fp32 graph that is quantized holds the exact parity check (max abs diff <= 1e-5 vs
   PyTorch on the validation inputs), as every fp32 export does;
2. the int8 file's task metric vs the fp32 graph's on the same inputs: accuracy on the
   labels for a classifier (outputs [N, classes] and labels given), else the mean
   per-example cosine of the int8 outputs to the fp32 outputs (fp32 = 1 by definition).
   The drop in points (100 x (fp32 - int8)) above ``max_accuracy_drop`` refuses the file
   (QuantizationRefused, exit 2, nothing written);
3. a looser output tolerance: the mean per-example cosine of int8 to fp32 outputs must be
   >= OUTPUT_MIN_COSINE (0.9), else VerificationError (exit 1): the int8 graph is broken;
4. the decoded int8 weights equal what the quantizer wrote and hold >= the mask's zeros.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import numpy as np
import onnx

from prunekit.errors import VerificationError, first_line

from .graph import packed_subgraph
from .lengths import other_length_parity
from .modes import QuantizationRefused
from .quantize import (
    calibration_batches,
    int8_weights,
    integer_ops,
    left_fp32,
    method_for,
    quantize_proto,
)
from .verify import check, check_weights, feeds, parity, session

OUTPUT_MIN_COSINE = 0.9


def cosines(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-example cosine [N] of ``got`` to ``want`` (both [N, ...], flattened per row, in
    float64); a pair of all-zero rows counts as 1."""
    a = want.reshape(len(want), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    both_zero = (np.abs(a).sum(axis=1) == 0) & (np.abs(b).sum(axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.where(norms > 0, norms, 1.0))


def compare(want: np.ndarray, got: np.ndarray, targets) -> dict:
    """fp32 outputs ``want`` vs int8 outputs ``got`` (both [N, ...]) on the same inputs.

    metric 'accuracy' (fraction of argmax == targets, targets [N] class indices) for
    outputs [N, classes] with targets given, else 'cosine' (mean per-example cosine to the
    fp32 outputs; fp32 scores 1.0). change_points = 100 x (int8 - fp32): negative = worse.
    """
    cos = cosines(want, got)
    out = {
        "n_inputs": int(len(want)),
        "cosine_mean": float(cos.mean()) if cos.size else 1.0,
        "cosine_min": float(cos.min()) if cos.size else 1.0,
        "max_abs_diff": float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0,
        "output_min_cosine": OUTPUT_MIN_COSINE,
    }
    if targets is not None and want.ndim == 2:
        labels = targets.cpu().numpy() if hasattr(targets, "cpu") else np.asarray(targets)
        fp32 = float((want.argmax(-1) == labels).mean())
        int8 = float((got.argmax(-1) == labels).mean())
        out.update(metric="accuracy", fp32=fp32, int8=int8)
    else:
        out.update(metric="cosine", fp32=1.0, int8=out["cosine_mean"])
    out["change_points"] = 100.0 * (out["int8"] - out["fp32"])
    return out


def check_drop(result: dict, limit: float) -> None:
    """QuantizationRefused (one line) when the metric dropped more than ``limit`` points."""
    drop = -result["change_points"]
    if drop > limit + 1e-9:  # 100 x (0.99 - 1.0) is 1.0000000000000009 in floats
        raise QuantizationRefused(
            f"int8 export refused: validation {result['metric']} drops {drop:.2f} points "
            f"({result['fp32']:.4f} fp32 -> {result['int8']:.4f} int8 on "
            f"{result['n_inputs']} inputs) > --max-accuracy-drop {limit:g}; raise the limit "
            "(--max-accuracy-drop, recipe export.max_accuracy_drop) or export without "
            "--quantize; nothing written"
        )


def pack_int8(proto: onnx.ModelProto, storage: str, expected: dict, rows: list) -> tuple:
    """Store the int8 weights of ``proto`` packed (uint8 deltas + int8 values, decoded
    in-graph and constant-folded by onnxruntime) where that is smaller; in place.

    expected: fp32 onnx name -> (array, pruned count) of the fp32 graph's matched weights
    (the quantizer names a weight W's int8 version ``W_quantized``); rows: their receipt
    rows. Returns (receipt rows, {int8 name: (int8 array, pruned count)}).
    """
    graph = proto.graph
    params = {r["onnx_name"]: r["name"] for r in rows}
    out_rows, out_expected, front, drop = [], {}, [], set()
    for name, array in int8_weights(proto).items():
        base = name.removesuffix("_quantized")
        if base not in expected:
            continue  # not a pruned model weight
        pruned = expected[base][1]
        zeros = int(array.size - np.count_nonzero(array))
        row = {"name": params.get(base, base), "onnx_name": name, "shape": list(array.shape),
               "sparsity": zeros / array.size if array.size else 0.0, "stored_as": "int8",
               "bytes": int(array.nbytes)}  # fmt: skip
        if storage == "packed":
            nodes, inits, nbytes = packed_subgraph(name, array)
            dense = next(t for t in graph.initializer if t.name == name).ByteSize()
            if sum(p.ByteSize() for p in (*nodes, *inits)) < dense:
                front += nodes
                graph.initializer.extend(inits)
                drop.add(name)
                row.update(stored_as="packed-int8", bytes=int(nbytes))
        out_rows.append(row)
        out_expected[name] = (array, pruned)
    keep = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(front + old)
    return out_rows, out_expected


def quantize_built(built, quantize: str, storage: str, check_inputs: tuple, calibration) -> tuple:
    """(the export with its int8 graph as ``stored``, the quantization record).

    built: core._Built of the fp32 graph (storage dense); check_inputs: (ref, call,
    inputs, targets) of the exact fp32 parity check; calibration: (inputs [N, ...] to draw
    calibration examples from, seed, what they are for the receipt). The fp32 graph must
    pass exact parity first.
    """
    ref, call, inputs, targets = check_inputs
    fp32_sess = session(built.dense.SerializeToString())[0]
    fp32_parity = parity(fp32_sess, ref, inputs, targets, False, None, call)
    method = method_for(quantize, built.dense)
    batches, examples = None, 0
    if method == "static":
        source, seed, _ = calibration
        batches = calibration_batches(partial(feeds, fp32_sess), source, seed=seed)
        examples = sum(n_rows_feed(b) for b in batches)
    proto = quantize_proto(built.dense, method, batches)
    rows, expected = pack_int8(proto, storage, built.expected, built.rows)
    record = {
        "mode": quantize, "method": method, "integer_ops": integer_ops(proto),
        "left_fp32": left_fp32(proto),
        "calibration": {"examples": examples, "seed": calibration[1], "source": calibration[2]}
        if method == "static" else None,
        "fp32_outputs": fp32_sess.run(None, feeds(fp32_sess, inputs))[0],
        "fp32_parity": fp32_parity,
    }  # fmt: skip
    return replace(built, stored=proto, rows=rows, expected=expected), record


def n_rows_feed(feed: dict) -> int:
    """Examples in one feed dict (dim 0 of its first array)."""
    return int(next(iter(feed.values())).shape[0])


def verifier(built, record: dict, check_inputs: tuple, example, limit: float):
    """verify(tmp path) -> (verification dict, session seconds) for the int8 file: see the
    module docstring. check_inputs: (ref, call, inputs, targets)."""
    ref, call, inputs, targets = check_inputs

    def verify(tmp: str) -> tuple[dict, float]:
        written = onnx.load(tmp)
        result = {"checker": check(written), **record["fp32_parity"]}
        sess, created = session(tmp)
        try:
            got = sess.run(None, feeds(sess, inputs))[0]
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise VerificationError(
                f"onnxruntime cannot run the int8 model on the verification inputs: "
                f"{first_line(exc)}"
            ) from exc
        if not np.isfinite(got).all():
            raise VerificationError("the int8 model produced non-finite outputs")
        int8 = compare(record["fp32_outputs"], got, targets)
        int8["max_accuracy_drop"] = limit
        check_drop(int8, limit)
        if int8["cosine_mean"] < OUTPUT_MIN_COSINE:
            raise VerificationError(
                f"int8 outputs diverge from the fp32 graph: mean cosine {int8['cosine_mean']:.4f}"
                f" < {OUTPUT_MIN_COSINE} on {int8['n_inputs']} inputs"
            )
        result["int8"] = int8
        if built.axes.groups():
            result["other_length"] = other_length_parity(
                sess, ref, call, built.axes, example, inputs, True
            )
        result["weights"] = check_weights(written, expected=built.expected)
        return result, created

    return verify


def latency_ratio(latency: dict, storage: str) -> dict:
    """int8 file / fp32 dense graph, p50 latency per batch size (the receipt's timings)."""
    mine, fp32 = latency.get(f"onnxruntime_{storage}", {}), latency.get("onnxruntime_dense", {})
    return {
        batch: mine[batch]["p50_ms"] / fp32[batch]["p50_ms"]
        for batch in mine
        if batch in fp32 and fp32[batch]["p50_ms"] > 0 and math.isfinite(mine[batch]["p50_ms"])
    }
