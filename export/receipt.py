"""The export receipt: export.json (atomic) and the rows a CLI prints."""

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
    extra = [("exporter fallback", receipt.get("exporter_fallback")),  # why the other ran
             ("exporter log", receipt.get("exporter_log"))]  # where exporters' output went
    rows[3:3] = [(label, str(value)) for label, value in extra if value]  # fmt: skip
    if "accuracy_change" in v:
        rows.append(("accuracy change", f"{v['accuracy_change']:+.4f}"))
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
    rows.append(("note", MEMORY_NOTE))
    return rows
