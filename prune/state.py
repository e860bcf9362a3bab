"""Run state on disk: atomic writes of JSON, JSON lines, safetensors, and run-dir checks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.errors import RunDirError
from prunekit.types import Masks

_UMASK = os.umask(0)
os.umask(_UMASK)

RUN_FILES = ("report.json", "metrics.jsonl", "masks.safetensors", "model.safetensors")


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same directory so the rename is atomic; it is removed
    if ``write`` raises, so ``path`` is either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs should read like any file
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_jsonl(path: Path | str, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines (one object per line), atomically."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Save tensors as safetensors with string metadata, atomically.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage are
    cloned (safetensors refuses shared storage).
    """
    seen: set[int] = set()
    clean = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        clean[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    meta = {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


def save_masks(path: Path | str, masks: Masks, metadata: dict) -> Path:
    """Save bool masks (True = keep) as uint8 safetensors, atomically."""
    as_bytes = {n: m.to(torch.uint8) for n, m in masks.items()}
    return save_tensors(path, as_bytes, {"prunekit.kind": "masks", **metadata})


def check_run_dir(
    out: Path | str,
    overwrite: bool,
    inputs: tuple[Path, ...] = (),
    extra_files: tuple[str, ...] = (),
) -> Path:
    """Validate the output directory before any work; raise RunDirError if unusable.

    Refuses a directory holding an earlier run unless ``overwrite``, a path that is a file,
    and any layout where a run file (or one of ``extra_files``) would replace one of
    ``inputs`` (the input is never overwritten, even with ``overwrite``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file; give a directory for the run")
    outputs = {(out / f).resolve() for f in (*RUN_FILES, *extra_files)}
    for src in inputs:
        if Path(src).resolve() in outputs:
            raise RunDirError(
                f"--out {str(out)!r} would overwrite the input {str(src)!r}; "
                "choose another directory"
            )
    earlier = [f for f in RUN_FILES if (out / f).exists()]
    if earlier and not overwrite:
        raise RunDirError(
            f"--out {str(out)!r} holds an earlier run ({', '.join(earlier)}); "
            "pass --overwrite or choose another directory"
        )
    return out
