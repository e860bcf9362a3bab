"""Run state on disk: atomic writes of JSON, JSON lines, safetensors, and run-dir checks."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.errors import RunDirError
from prunekit.types import Masks

_UMASK = os.umask(0)
os.umask(_UMASK)

RUN_FILES = (
    "report.json",
    "metrics.jsonl",
    "masks.safetensors",
    "model.safetensors",
    "state/latest.json",
)


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same directory so the rename is atomic; it is removed
    if ``write`` raises, so ``path`` is either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600 and some writers recreate the file: set the mode last
        os.chmod(tmp, 0o666 & ~_UMASK)
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


STATE_DIR = "state"


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise KeyboardInterrupt.

    Used around checkpoint writes so an interrupt never leaves a half-written state;
    outside the main thread signals cannot be handled and the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]} during a checkpoint write")


def save_step_state(run_dir: Path | str, step: int, tensors: dict, info: dict) -> Path:
    """Checkpoint a finished step: tensors (safetensors) then latest.json pointing to them.

    Both writes are atomic and happen with signals deferred; older step files are removed
    only after latest.json points to the new one.
    """
    state = Path(run_dir) / STATE_DIR
    name = f"step-{step:05d}.safetensors"
    with deferred_signals():
        save_tensors(state / name, tensors, {"prunekit.kind": "state", "prunekit.step": step})
        write_json(state / "latest.json", {**info, "step": step, "tensors": name})
        for old in state.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
    return state / name


def load_step_state(run_dir: Path | str) -> tuple[dict, dict] | None:
    """(tensors, info) of the latest finished step, or None when there is no checkpoint."""
    from safetensors.torch import load_file

    latest = Path(run_dir) / STATE_DIR / "latest.json"
    if not latest.exists():
        return None
    info = json.loads(latest.read_text())
    return load_file(str(latest.parent / info["tensors"])), info
