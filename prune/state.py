"""Run state on disk: atomic writes of JSON, JSON lines, safetensors, and run-dir checks.

Resume state (``state/latest.json`` and the step file it names) is untrusted input: it is
validated before use and every problem becomes a RunDirError naming the file. Reading it
never writes or deletes anything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.errors import RunDirError, first_line
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


# ------------------------------------------------------------------ resume state, validated

LATEST = "latest.json"
STATE_KIND = "state"
# safetensors itself refuses headers above 100 MB; a corrupt length must not make us read more
MAX_HEADER_BYTES = 100_000_000
MAX_LATEST_BYTES = 256_000_000  # metrics and NTK records of a long run are a few MB
STEP_FILE = re.compile(r"step-[0-9]{5,}\.safetensors")
Schema = Mapping[str, "type | tuple[type, ...]"]
_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _bad(path: Path, problem: str) -> RunDirError:
    return RunDirError(
        f"resume state {str(path)!r} {problem}; it is not a usable prunekit checkpoint: "
        "restore it, or start the run again with --overwrite"
    )


def _short(value, limit: int = 80) -> str:
    """repr of a value read from the file, capped: messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_regular(path: Path, limit: int):
    """(open binary file, size): refuses anything but a regular file of at most ``limit``
    bytes. O_NONBLOCK so that a FIFO planted in its place cannot hang the open."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _bad(path, "is missing") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _bad(path, "is not a regular file")
    if info.st_size > limit:
        os.close(fd)
        raise _bad(path, f"is {info.st_size} bytes, more than a checkpoint file ({limit})")
    return os.fdopen(fd, "rb"), info.st_size


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _is(value, expected: type | tuple[type, ...]) -> bool:
    """isinstance, except that a JSON boolean is never an integer or a number."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if float in kinds and isinstance(value, int):
        return True  # JSON writes 1.0 as 1 when the writer had an int
    return isinstance(value, kinds)


def _type_names(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)


def read_latest_json(latest: Path) -> dict:
    """Parse ``latest.json`` as a UTF-8 JSON object; RunDirError naming the file otherwise."""
    f, _ = _open_regular(latest, MAX_LATEST_BYTES)
    try:
        with f:
            raw = f.read()
    except OSError as exc:
        raise _bad(latest, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(latest, f"is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else ""
        msg = exc.msg if hasattr(exc, "msg") else "nested too deeply"
        raise _bad(latest, f"is not valid JSON ({msg}{where})") from None
    if not isinstance(info, dict):
        raise _bad(latest, f"holds a JSON {_json_type(info)}, expected an object")
    return info


def check_state_info(
    latest: Path, info: dict, required: Schema | None = None, optional: Schema | None = None
) -> None:
    """Check the keys and value types of a parsed ``latest.json``.

    Always: ``step`` an integer >= 0 and ``tensors`` a string. ``required`` / ``optional``
    map the caller's own keys to their JSON types (e.g. ``{"rows": list}``); when either is
    given, any other key is refused too, so a file from another tool or version is caught.
    """
    schema = {"step": int, "tensors": str, **(required or {})}
    missing = sorted(k for k in schema if k not in info)
    if missing:
        raise _bad(latest, f"lacks the keys {missing}; expected the keys {sorted(schema)}")
    if required is not None or optional is not None:
        known = set(schema) | set(optional or {})
        unknown = sorted(k for k in info if k not in known)
        if unknown:
            raise _bad(
                latest, f"has unexpected keys {_short(unknown[:8])}; valid keys: {sorted(known)}"
            )
    for key, expected in {**(optional or {}), **schema}.items():
        if key in info and not _is(info[key], expected):
            raise _bad(
                latest,
                f"has {key!r} of type {_json_type(info[key])}, expected {_type_names(expected)}",
            )
    if info["step"] < 0:
        raise _bad(latest, f"has step {info['step']}, expected an integer >= 0")


def state_file(latest: Path, name: str) -> Path:
    """The step file that ``latest.json`` names, refused unless it is a plain file name
    inside the state folder (no absolute path, separator or '..'; symlinks resolved)."""
    state = latest.parent
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise _bad(latest, f"names the absolute path {_short(name)}; expected a file name")
    seps = {"/", "\\", os.sep, os.altsep or "/"}
    if "\0" in name or any(s in name for s in seps) or ".." in name:
        raise _bad(
            latest, f"names {_short(name)}; expected a plain file name (no separator or '..')"
        )
    if not STEP_FILE.fullmatch(name):
        raise _bad(
            latest, f"names {_short(name)}; expected a file name like 'step-00003.safetensors'"
        )
    target = (state / name).resolve()
    if target.parent != state.resolve():
        raise _bad(
            latest, f"names {_short(name)}, which resolves to {_short(str(target))} outside {state}"
        )
    return state / name


def _read_header(path: Path) -> tuple[dict, int]:
    """(parsed safetensors header, size of the data section) without reading the data."""
    f, size = _open_regular(path, 1 << 62)
    try:
        with f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0:
                raise _bad(path, f"is truncated ({size} bytes, no safetensors header)")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _bad(
                    path,
                    f"is truncated or corrupt (header of {length} bytes in a file of {size} bytes)",
                )
            raw = f.read(length)
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad(path, "has a corrupt safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "has a corrupt safetensors header (not a JSON object)")
    return header, size - 8 - length


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, tuple]:
    """{name: (dtype, shape)}; every entry well formed and inside the data section."""
    found = {}
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(_is(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(_is(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]
        if not ok:
            raise _bad(path, f"has a corrupt safetensors entry for tensor {_short(name)}")
        if offsets[1] > data_size:
            raise _bad(
                path,
                f"is truncated (tensor {_short(name)} ends at byte {offsets[1]} of a data section "
                f"of {data_size} bytes)",
            )
        found[name] = (entry["dtype"], tuple(shape))
    return found


def check_state_file(path: Path, step: int) -> dict[str, tuple]:
    """Validate a step file without loading its tensors; returns {name: (dtype, shape)}.

    Refuses a missing, truncated or corrupt file, and one whose metadata is not
    ``prunekit.kind=state`` with ``prunekit.step`` equal to ``step``.
    """
    header, data_size = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "has corrupt safetensors metadata (not an object)")
    kind = meta.get("prunekit.kind")
    if kind != STATE_KIND:
        raise _bad(
            path, f"is not a resume state (prunekit.kind is {_short(kind)}, expected 'state')"
        )
    if meta.get("prunekit.step") != str(step):
        raise _bad(
            path,
            f"holds step {_short(meta.get('prunekit.step'))} but latest.json names step {step}",
        )
    return _check_entries(path, header, data_size)


def check_step_state(
    run_dir: Path | str, required: Schema | None = None, optional: Schema | None = None
) -> dict | None:
    """Validate ``run_dir/state`` without loading tensors; its info dict, or None when
    there is no checkpoint (no latest.json). RunDirError naming the file otherwise.

    ``required`` / ``optional``: see ``check_state_info``. Resume code calls this before
    any long work so that a bad checkpoint is refused at start.
    """
    latest = Path(run_dir) / STATE_DIR / LATEST
    if latest.parent.is_symlink():  # resume writes there too: never through a link elsewhere
        raise _bad(latest.parent, "is a symbolic link; expected a folder inside the run")
    if os.path.lexists(latest.parent) and not latest.parent.is_dir():
        raise _bad(latest.parent, "is not a folder")
    if not os.path.lexists(latest):
        return None
    info = read_latest_json(latest)
    check_state_info(latest, info, required, optional)
    check_state_file(state_file(latest, info["tensors"]), info["step"])
    return info


def check_state_keys(
    tensors: Mapping[str, object],
    expected: Iterable[str] | Mapping[str, object],
    optional_prefixes: tuple[str, ...] = (),
    path: Path | str = "state",
) -> None:
    """Refuse state tensors that are not the ones the run expects (RunDirError).

    ``expected``: the names the run needs; a mapping name -> shape also checks shapes (a
    shape of None skips that one). Names starting with one of ``optional_prefixes`` (e.g.
    ``"cache/"``) may be present or not.
    """
    want = set(expected)
    missing = sorted(want - set(tensors))
    unexpected = sorted(
        k for k in set(tensors) - want if not k.startswith(tuple(optional_prefixes))
    )
    if missing or unexpected:
        raise _bad(
            Path(path),
            f"does not fit this run (missing tensors {_short(missing[:5])}, unexpected tensors "
            f"{_short(unexpected[:5])}; {len(missing)} missing, {len(unexpected)} unexpected)",
        )
    if isinstance(expected, Mapping):
        for name, shape in expected.items():
            have = tuple(getattr(tensors[name], "shape", ()))
            if shape is not None and have != tuple(shape):
                raise _bad(
                    Path(path),
                    f"has tensor {_short(name)} of shape {list(have)}, expected {list(shape)}",
                )


def load_step_state(
    run_dir: Path | str,
    required: Schema | None = None,
    optional: Schema | None = None,
    expected: Iterable[str] | Mapping[str, object] | None = None,
    optional_prefixes: tuple[str, ...] = (),
) -> tuple[dict, dict] | None:
    """(tensors, info) of the latest finished step, or None when there is no checkpoint.

    Everything is validated first (``check_step_state``; with ``expected``, also
    ``check_state_keys``): a corrupt, truncated or foreign state is a RunDirError naming
    the file, never a traceback, and nothing is written or deleted.
    """
    from safetensors.torch import load_file

    info = check_step_state(run_dir, required, optional)
    if info is None:
        return None
    path = Path(run_dir) / STATE_DIR / info["tensors"]
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own checks (sizes, dtypes) beyond the header
        raise _bad(path, f"cannot be loaded ({first_line(exc)})") from None
    if expected is not None:
        check_state_keys(tensors, expected, optional_prefixes, path)
    return tensors, info
