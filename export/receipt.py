"""The export receipt: ``<model>.onnx.json`` beside the model (atomic), the one-line size
warning, and the rows a CLI prints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)

MEMORY_NOTE = (
    "onnxruntime holds sparse and packed weights densely in memory once the session is "
    "created (sparse initializers are densified, packed ones constant-folded): storage "
    "modes shrink the file, not RAM or latency; only removed units make inference faster."
)


INT8_NOTE = (
    "onnxruntime computes this model's MatMul/Gemm (int8-static: also Conv) in int8 with "
    "int8 weights in memory (packed ones constant-folded at session creation); whether that "
    "is faster than fp32 depends on the CPU and the layer sizes: see the int8 / fp32 "
    "latency row, measured here."
)


def size_warning(
    name: str, sizes: dict, storage: str, graph_bytes: int, repeats: int = 1
) -> str | None:
    """One line when the written file is larger than the dense export of the same graph
    (the storage mode does not pay off), or, for a storage mode other than dense, larger
    than the dense fp32 weights (the graph itself outweighs what pruning saved); else None.

    sizes: bytes of the 'file', the 'dense_onnx' export and the 'dense_fp32' weights;
    graph_bytes: the file's bytes that are not weights (nodes, attributes, constants);
    repeats: the most nodes that read one weight (>= 3: a loop unrolled that many times).
    """
    size, dense, weights = sizes["file"], sizes["dense_onnx"], sizes["dense_fp32"]
    if size > dense:
        return (
            f"{name} is {size:,} bytes, {size / dense:.2f}x the dense export of the same graph "
            f"({dense:,} bytes): storage {storage!r} does not pay off at this sparsity; "
            "storage 'dense' writes the smaller file"
        )
    if storage != "dense" and size > weights:
        return (
            f"{name} is {size:,} bytes, {size / weights:.2f}x the model's dense fp32 weights "
            f"({weights:,} bytes): {graph_bytes:,} of its bytes are the graph itself (nodes, "
            "names, constants), which pruning does not shrink"
            + (
                f"; a weight read by {repeats} nodes: a loop unrolled {repeats} times"
                if repeats >= 3
                else ""
            )
        )
    return None


def exporter_log_path(path: str | os.PathLike) -> Path:
    """Where export_onnx writes what the exporters printed by default: ``<path>.log``."""
    path = Path(path)
    return path.with_name(path.name + ".log")


def export_outputs(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Every file an export to ``path`` may write: the model, its receipt, the exporter log."""
    return Path(path), receipt_path(path), exporter_log_path(path)


def receipt_path(path: str | os.PathLike) -> Path:
    """Where the receipt of the ONNX file ``path`` goes: beside it, named after it
    (``model.onnx`` -> ``model.onnx.json``), so exports into one folder never collide."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_receipt(receipt: dict, path: str | os.PathLike) -> Path:
    """Write ``receipt`` as indented JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(receipt, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _lat(lat: dict, runner: str, batch: str) -> str:
    row = lat.get(runner, {}).get(batch)
    return f"{row['p50_ms']:.3f} / {row['p90_ms']:.3f} ms" if row else "-"


def _inputs(inputs: list[dict]) -> str:
    """'input_ids int64 [batch, sequence], ...' from the receipt's graph inputs."""
    parts = [f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]" for i in inputs]
    return ", ".join(parts) or "-"


def receipt_table(receipt: dict) -> list[tuple[str, str]]:
    """(label, value) rows summarising a receipt, for a two-column printed table."""
    b, v, c = receipt["bytes"], receipt["verification"], receipt["cleanup"]
    storage = receipt["storage"] + (f" + {receipt['quantize']}" if receipt["quantize"] else "")
    rows = [
        ("file", receipt["path"]),
        ("storage", storage),
        ("exporter / opset", f"{receipt['exporter']} / {receipt['opset']}"),
        ("inputs", _inputs(receipt.get("inputs", []))),
        ("bytes", f"{b['file']:,} = {b['ratio']:.4f}x dense fp32 ({b['dense_fp32']:,})"),
        ("parameters", f"{c['params_before']:,} -> {c['params_after']:,}"),
        ("checker", v["checker"]),
        ("max abs diff", f"{v['max_abs_diff']:.3g} on {v['n_inputs']} inputs"),
        ("decoded zeros", f"{v['weights']['zeros']:,} >= {v['weights']['pruned']:,} pruned"),
        ("session creation", f"{receipt['session_creation_s'] * 1e3:.1f} ms"),
    ]
    extra = [
        ("exporter fallback", receipt.get("exporter_fallback")),  # why the other ran
        ("exporter log", receipt.get("exporter_log")),  # where the exporters' output went
        ("dynamic axes", _dynamic(receipt.get("dynamic_axes") or {})),
    ]
    rows[3:3] = [(label, str(value)) for label, value in extra if value]
    other = v.get("other_length")
    if other:
        at = ", ".join(f"{d}={n}" for d, n in other["lengths"].items())
        after = next(k for k, (label, _) in enumerate(rows) if label == "max abs diff") + 1
        diff = f"max abs diff {other['max_abs_diff']:.3g} ({at})"
        rows.insert(after, ("at another length", diff))
    if "accuracy_change" in v:
        rows.append(("accuracy change", f"{v['accuracy_change']:+.4f}"))
    if receipt.get("quantization"):  # the exact parity is the fp32 graph's; int8 rows follow
        at = next(k for k, (label, _) in enumerate(rows) if label == "max abs diff")
        rows[at] = ("fp32 graph max abs diff", rows[at][1])
        rows = [("fp32 graph " + a if a == "accuracy change" else a, b) for a, b in rows]
        rows += _int8_rows(receipt["quantization"])
    for t in receipt["tensors"]:
        shape = "x".join(str(s) for s in t["shape"])
        rows.append((f"tensor {t['name']}", f"{shape}, {t['sparsity']:.1%} zero, {t['stored_as']}"))
    for text in c["actions"]:
        rows.append(("cleanup", text))
    for text in c["skipped"]:
        rows.append(("cleanup skipped", text))
    lat = receipt.get("latency") or {}
    for runner in lat:
        for batch in ("batch1", "batch64"):
            rows.append((f"{runner} {batch} p50/p90", _lat(lat, runner, batch)))
    note = INT8_NOTE if receipt.get("quantization") else MEMORY_NOTE
    rows.append(("note", note))  # warnings: logged once, as a CLI note line
    return rows


def _int8_rows(q: dict | None) -> list[tuple[str, str]]:
    """Rows of an int8-compute export: method and ops, fp32 vs int8 metric, latency ratio."""
    if not q:
        return []
    ops = ", ".join(f"{k} x{v}" for k, v in q["integer_ops"].items()) or "none"
    cal = q.get("calibration")
    method = q["method"] + (f", calibrated on {cal['examples']} {cal['source']}" if cal else "")
    metric = (
        f"{q['fp32']:.4f} fp32 -> {q['int8']:.4f} int8 ({q['change_points']:+.2f} points, "
        f"limit -{q['max_accuracy_drop']:g}) on {q['n_inputs']} inputs"
    )
    sizes = q["bytes"]
    fp32 = ", ".join(f"{k} x{v}" for k, v in q.get("left_fp32", {}).items()) or "none"
    rows = [("int8 compute", f"{q['mode']} ({method}): {ops}"),
            ("left in fp32", fp32),
            (f"int8 {q['metric']}", metric),
            ("int8 vs fp32 outputs", f"mean cosine {q['cosine_mean']:.4f} (>= "
             f"{q['output_min_cosine']}), max abs diff {q['max_abs_diff']:.3g}"),
            ("int8 bytes", f"{sizes['int8_file']:,} (fp32 {sizes['fp32_onnx']:,})")]  # fmt: skip
    ratio = q.get("latency_ratio") or {}
    if ratio:
        text = ", ".join(f"{b} {r:.2f}x" for b, r in ratio.items())
        rows.append(("int8 / fp32 latency", text + " (p50, onnxruntime)"))
    return rows


def _dynamic(axes: dict) -> str:
    """'input:1 (asked); ids:1, mask:1 (inferred)', or '' when only the batch is dynamic."""
    parts = [f"{', '.join(axes[k])} ({k})" for k in ("asked", "inferred") if axes.get(k)]
    return "; ".join(parts)
