"""Probe sets and ntk.jsonl records for the NTK alignment log (methods.md section 3.5).

Pure functions: nothing here touches a model, and randomness comes from an explicit
``torch.Generator`` seeded by the caller.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from prunekit.errors import RunDirError, SettingError, choice_error

_UMASK = os.umask(0)
os.umask(_UMASK)

PHASES = ("dense", "prune", "finetune", "final")
PROBE_FILE = "probe.json"
# The paper's schedule (methods.md 3.6): iteration 0, then int(5 * 1.15^k).
DEFAULT_MULTIPLIER = 1.15
_FIRST = 5


def _indices(n: int, k: int, generator: torch.Generator, what: str) -> list[int]:
    if n < 0 or k < 0:
        raise SettingError(f"{what}: sizes must be >= 0, got n={n}, probe={k}")
    order = torch.randperm(n, generator=generator)[: min(k, n)]
    return sorted(int(i) for i in order)


def select_probe(
    n_train: int, n_val: int, probe_train: int = 100, probe_val: int = 100, seed: int = 0
) -> dict:
    """Seeded probe indices, fixed once per run.

    n_train/n_val: sizes of the training and validation sets; probe_train/probe_val: how many
    examples to draw from each (without replacement; all of them if the set is smaller).
    Returns {"train": sorted indices, "val": sorted indices, "seed": seed}; the same arguments
    always give the same indices (one torch.Generator, train drawn before val).
    """
    generator = torch.Generator().manual_seed(int(seed))
    train = _indices(int(n_train), int(probe_train), generator, "training probe")
    val = _indices(int(n_val), int(probe_val), generator, "validation probe")
    return {"train": train, "val": val, "seed": int(seed)}


def save_probe(run_dir: str | Path, probe: dict) -> Path:
    """Write ``probe`` to run_dir/probe.json atomically (temporary file + rename)."""
    path = Path(run_dir) / PROBE_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(probe, handle)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_probe(run_dir: str | Path) -> dict:
    """The probe stored by :func:`save_probe` (for --resume); RunDirError if absent."""
    path = Path(run_dir) / PROBE_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {PROBE_FILE} to resume the NTK probe set from")
    return json.loads(path.read_text())


def _finite(value):
    """JSON-safe float: NaN/inf (undefined alignment) become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def ntk_record(
    step: int,
    phase: str,
    iteration: int | None,
    sparsity: float,
    train_result: dict,
    val_result: dict | None = None,
) -> dict:
    """One ntk.jsonl line from two :func:`ntk_alignment` results.

    step: pruning step (0 = dense, before pruning); phase: 'dense' (before pruning),
    'prune' (right after step ``step`` removed weights), 'finetune' (during or at the end of
    that step's fine-tuning; ``iteration`` = optimiser updates done so far in it), 'final'
    (after the final fine-tune); iteration: None outside fine-tuning; sparsity: fraction of
    target weights pruned. val_result None -> validation fields are None. Undefined (NaN)
    values are written as null.
    """
    if phase not in PHASES:
        raise choice_error("NTK record phase", phase, PHASES)
    record = {
        "step": int(step),
        "phase": phase,
        "iteration": None if iteration is None else int(iteration),
        "sparsity": float(sparsity),
    }
    for suffix, result in (("train", train_result), ("val", val_result)):
        result = result or {}
        record[f"alignment_{suffix}"] = _finite(result.get("alignment"))
        per_layer = result.get("per_layer") or {}
        record[f"per_layer_{suffix}"] = (
            {k: _finite(v) for k, v in per_layer.items()} if result else None
        )
        record[f"effective_rank_{suffix}"] = _finite(result.get("effective_rank"))
        record[f"trace_{suffix}"] = _finite(result.get("trace"))
    return record


def _parse_every(every) -> tuple[str, float]:
    if every is None:
        return "multiplier", DEFAULT_MULTIPLIER
    if isinstance(every, str):
        text = every.strip().lower()
        try:
            if text.startswith("x"):
                return _parse_every(float(text[1:]))
            return _parse_every(int(text))
        except ValueError:
            pass
        raise SettingError(
            f"ntk every {every!r} is not 'none', 'xM' (multiplier M > 1) or a stride N"
        )
    if isinstance(every, bool):
        raise SettingError(f"ntk every {every!r} must be a number")
    if isinstance(every, int):
        if every < 1:
            raise SettingError(f"ntk every stride {every} must be >= 1 iteration")
        return "stride", every
    if not float(every) > 1.0:
        raise SettingError(f"ntk every multiplier {every!r} must be > 1 (e.g. 1.15)")
    return "multiplier", float(every)


def log_spaced_iterations(total: int, every: int | float | str | None = None) -> list[int]:
    """Fine-tuning iterations (0-based update counts) at which to log the NTK alignment.

    ``every`` selects the schedule; all schedules include 0 and drop values > total:
    - None or a float M > 1 (or the string 'xM'): log-spaced, 0 and int(5 * M^k) for
      k = 0, 1, ... (M = 1.15 is the paper's schedule: 0, 5, 6, 7, 8, 10, 11, 13, ...);
    - an int N >= 1 (or the string 'N'): fixed stride, 0, N, 2N, ...
    - 'none': only 0 (no logging inside fine-tuning).
    Returns a sorted list without duplicates; [0] when total = 0.
    """
    total = int(total)
    if total < 0:
        raise SettingError(f"total iterations {total} must be >= 0")
    if every == "none":
        return [0]
    kind, value = _parse_every(every)
    if kind == "stride":
        return list(range(0, total + 1, int(value)))
    points, k = {0}, 0
    while (it := int(_FIRST * value**k)) <= total:
        points.add(it)
        k += 1
    return sorted(points)
