"""The run directory as a unit: checked at start, locked, written aside, published at once.

``run_directory(out, ...)`` is what the ``run`` and ``prune`` commands wrap their work in.
Everything it keeps lives beside ``--out DIR``, in DIR's parent folder:

    .DIR.prunekit-lock      flock held while a run owns DIR (its pid and start time inside)
    .DIR.prunekit-partial/  the run being written; its state/ is what --resume continues
    .DIR.prunekit-trash/    the run being replaced, for the moment of publishing

Why beside DIR and not inside it: DIR does not exist until the run is published, and is then
replaced as a whole by a rename, so a lock inside it would move with it. One lock file beside
it guards DIR, the partial and the trash together, and needs only the parent folder's write
permission, which the final rename needs anyway. The kernel drops a flock when its holder
dies (SIGKILL included), so a crashed run never blocks the next one: its stale lock file is
locked again and rewritten. A clean release removes the file (prunekit.prune.runlock).

Publishing: rename DIR to the trash, rename the partial to DIR, move the user's own files
(anything that is not a run output, e.g. notes or an input checkpoint kept in DIR) back from
the trash into the new DIR, delete the trash. A reader sees the old run, then for the
microseconds between two renames nothing, then the new run; never a half-written one. A
crash between the two renames is repaired by the next run into DIR (the old run goes back).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import RunDirError
from prunekit.prune.runlock import RunLock, in_use, lock_holder
from prunekit.prune.state import (
    LATEST,
    RUN_FILES,
    STATE_DIR,
    check_run_dir,
    check_step_state,
    deferred_signals,
)

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".prunekit-partial"
LOCK_SUFFIX = ".prunekit-lock"
TRASH_SUFFIX = ".prunekit-trash"
# top-level names a run writes into DIR (design.md section 6 plus the state it resumes from);
# with --overwrite these are replaced, every other entry of an existing DIR is kept. A recipe
# exports model.onnx with its receipt model.onnx.json and exporter log model.onnx.log;
# export.json is the receipt's name in runs of older versions: replaced, never read.
RUN_OUTPUTS = frozenset(
    {f.split("/")[0] for f in RUN_FILES}
    | {"ntk.jsonl", "probe.json", "teacher.safetensors", "plots"}
    | {"model.onnx", "model.onnx.json", "model.onnx.log", "export.json"}
)


@dataclass(frozen=True)
class RunPaths:
    """Where a run lives: ``out`` (resolved) and its siblings; ``given`` for messages."""

    given: str
    out: Path
    partial: Path
    lock: Path
    trash: Path


def run_paths(out: Path | str) -> RunPaths:
    """The run folder (symlinks resolved, so the siblings sit beside the real folder) and its
    partial, lock and trash siblings. RunDirError for the root folder or a too-long name."""
    real = Path(os.path.realpath(os.fspath(out)))
    name = real.name
    if not name:
        raise RunDirError(f"--out {str(out)!r} is the root folder; give a folder for the run")
    if len(os.fsencode(f".{name}{PARTIAL_SUFFIX}")) > 255:
        raise RunDirError(f"--out name {name[:40]!r}... is too long; use at most 200 characters")
    parent = real.parent
    return RunPaths(
        given=str(out),
        out=real,
        partial=parent / f".{name}{PARTIAL_SUFFIX}",
        lock=parent / f".{name}{LOCK_SUFFIX}",
        trash=parent / f".{name}{TRASH_SUFFIX}",
    )


def partial_path(out: Path | str) -> Path:
    """The folder an unfinished run into ``out`` is written to (what --resume continues)."""
    return run_paths(out).partial


def output_names(out: Path, extra_files: tuple[str, ...] = ()) -> frozenset[str]:
    """Top-level names in ``out`` that belong to a run: RUN_OUTPUTS plus ``extra_files``
    that land inside ``out`` (e.g. an --export path in the run folder)."""
    names = set(RUN_OUTPUTS)
    for extra in extra_files:
        try:
            rel = Path(os.path.abspath(out / extra)).relative_to(out)
        except ValueError:
            continue  # written elsewhere: not part of the run folder
        if rel.parts:
            names.add(rel.parts[0])
    return frozenset(names)


# ------------------------------------------------------------------ checks at start


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path):
        path = path.parent
    return path


def _check_location(paths: RunPaths) -> Path:
    """The nearest existing folder above ``out`` (where the first write happens)."""
    folder = _existing_ancestor(paths.out.parent)
    if not folder.is_dir():
        raise RunDirError(
            f"--out {paths.given!r} is under {str(folder)!r}, which is a file, not a folder; "
            "choose another --out"
        )
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working folder was deleted: nothing of ours to protect
        return folder
    if cwd == paths.out or paths.out in cwd.parents:
        raise RunDirError(
            f"--out {paths.given!r} is the current folder or contains it; a run folder is "
            "replaced as a whole when the run ends: choose a folder inside it"
        )
    return folder


def _check_inputs(paths: RunPaths, inputs, extra_files, outputs: frozenset[str]) -> None:
    """Inputs are never replaced or deleted: not a run file, not inside a run output
    folder (state/, plots/), not inside the partial or trash folders."""
    given = Path(paths.given)  # check_run_dir's messages then name the path as typed
    check_run_dir(given, True, inputs=tuple(inputs), extra_files=tuple(extra_files))
    guarded = [paths.out / name for name in outputs] + [paths.partial, paths.trash]
    for src in inputs:
        real = Path(os.path.realpath(src))
        for place in guarded:
            if real == place or place in real.parents:
                raise RunDirError(
                    f"--out {paths.given!r} would replace the input {str(src)!r} (it lies in "
                    f"{str(place)!r}); choose another --out or move the input"
                )


def _refuse_earlier_run(paths: RunPaths, inputs, extra_files, outputs) -> None:
    check_run_dir(Path(paths.given), False, inputs=tuple(inputs), extra_files=tuple(extra_files))
    if paths.out.is_dir():
        found = sorted(n for n in os.listdir(paths.out) if n in outputs)
        if found:
            raise RunDirError(
                f"--out {paths.given!r} holds outputs of an earlier run ({', '.join(found)}); "
                "pass --overwrite or choose another directory"
            )


def _decide(paths: RunPaths, overwrite: bool, resume: bool, inputs, extra_files, outputs) -> str:
    """'partial' (continue the interrupted run), 'published' (resume from the state of the
    run in ``out``) or 'fresh'; raises the refusals that depend on what is on disk."""
    for own in (paths.partial, paths.trash):
        if own.is_symlink():  # prunekit makes folders there; a link would redirect writes
            raise RunDirError(f"{str(own)!r} is a symbolic link, not prunekit's; remove it")
    if os.path.lexists(paths.partial / STATE_DIR / LATEST):
        if resume:
            check_step_state(paths.partial)
            return "partial"
        if not overwrite:
            raise RunDirError(
                f"--out {paths.given!r}: an interrupted run exists at {str(paths.partial)!r}; "
                "--resume continues it (or --overwrite discards it)"
            )
    if resume and check_step_state(paths.out) is not None:
        return "published"
    if not overwrite:
        try:
            _refuse_earlier_run(paths, inputs, extra_files, outputs)
        except RunDirError as exc:
            if not resume:
                raise
            raise RunDirError(
                f"--resume: nothing to resume in --out {paths.given!r} (no "
                f"{STATE_DIR}/{LATEST} there or in {str(paths.partial)!r}), and it holds an "
                "earlier run; pass --overwrite to replace it"
            ) from exc
    return "fresh"


def _probe(folder: Path, given: str, option: str = "--out") -> None:
    """Create and remove a file in ``folder``: a read-only or full folder fails now, not
    after the compute."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".prunekit-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise RunDirError(
            f"{option} {given!r}: cannot write in the folder {str(folder)!r} "
            f"({exc.strerror or exc}); choose a writable folder"
        ) from None


def check_output_folder(path: Path | str, option: str) -> Path:
    """Check, before any work, that the file ``path`` (given as ``option``) can be written
    once its missing folders are made: the nearest existing folder above it is a folder
    and writable (a probe file is made and removed). Returns that folder; RunDirError (one
    line, naming the path) otherwise."""
    path = Path(path)
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise RunDirError(
            f"{option} {str(path)!r} is under {str(folder)!r}, which is a file, not a folder; "
            "choose another path"
        )
    _probe(folder, str(path), option)
    return folder


@contextmanager
def output_folders(path: Path | str, option: str) -> Iterator[list[Path]]:
    """Create the missing folders above the output file ``path`` for the block (call it
    once every check has passed); yields them. If the block raises, the folders it made
    are removed again (those still empty): a failed command leaves nothing behind."""
    created = _make_parents(Path(path).parent, str(path), option)
    try:
        yield created
    except BaseException:
        _remove_dirs(created)
        raise


def preflight(
    out: Path | str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs=(),
    extra_files: tuple[str, ...] = (),
) -> RunPaths:
    """Every refusal ``run_directory`` makes at start, without taking the lock and without
    leaving anything on disk (a probe file is created and removed in the nearest existing
    folder). For processes that must fail early but do not write the run (other ranks).
    """
    paths = run_paths(out)
    folder = _check_location(paths)
    outputs = output_names(paths.out, tuple(extra_files))
    _check_inputs(paths, inputs, extra_files, outputs)
    holder = lock_holder(paths.lock)
    if holder is not None:
        raise in_use(paths.given, holder)
    _decide(paths, overwrite, resume, inputs, extra_files, outputs)
    _probe(folder, paths.given)
    return paths


# ------------------------------------------------------------------ work folder and publish


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _make_parents(folder: Path, given: str, option: str = "--out") -> list[Path]:
    """Create ``folder`` and the missing ones above it (outermost first); returns them."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for path in reversed(missing):
            os.mkdir(path)
            created.append(path)
    except OSError as exc:
        _remove_dirs(created)
        raise RunDirError(
            f"{option} {given!r}: cannot create the folder {str(path)!r} ({exc.strerror or exc})"
        ) from None
    return created


def _remove_dirs(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            pass  # not empty any more: someone else uses it now


def _carry_back(trash: Path, out: Path, outputs: frozenset[str]) -> None:
    """Move the user's own entries of the replaced folder into the new run folder. Run
    outputs of the old run are stale and stay in the trash; so does an entry the new run
    also wrote (only an output not declared in extra_files can clash)."""
    for name in sorted(os.listdir(trash)):
        if name in outputs or os.path.lexists(out / name):
            continue
        os.rename(trash / name, out / name)


def _recover_trash(paths: RunPaths, outputs: frozenset[str]) -> None:
    """Finish a publish that died half-way (under the lock)."""
    if not os.path.lexists(paths.trash):
        return
    if not os.path.lexists(paths.out):  # died between the two renames: put the old run back
        log.warning("restoring %s from %s (a publish was interrupted)", paths.out, paths.trash)
        os.rename(paths.trash, paths.out)
        return
    _carry_back(paths.trash, paths.out, outputs)
    _remove(paths.trash)


def _open_work(paths: RunPaths, mode: str) -> tuple[Path, bytes | None]:
    """(work folder, baseline): baseline None means keep the folder whatever happens (an
    interrupted run being continued); else the bytes of its latest.json at start."""
    if mode == "partial":
        return paths.partial, None
    if os.path.lexists(paths.partial):
        # --overwrite discards an interrupted run; a partial without a checkpoint is debris
        _remove(paths.partial)
    os.mkdir(paths.partial)
    if mode == "fresh":
        return paths.partial, b""
    try:
        shutil.copytree(paths.out / STATE_DIR, paths.partial / STATE_DIR, symlinks=True)
        return paths.partial, (paths.partial / STATE_DIR / LATEST).read_bytes()
    except BaseException:  # a half copy must not pass for an interrupted run later
        _remove(paths.partial)
        raise


def _abandon(work: Path, baseline: bytes | None) -> None:
    """After a failure: keep the work folder when it holds a checkpoint worth resuming."""
    if baseline is None:
        return
    latest = work / STATE_DIR / LATEST
    try:
        now = latest.read_bytes() if latest.is_file() else b""
        if now == baseline:  # nothing new to resume: the folder would only be debris
            _remove(work)
        else:
            log.info("interrupted run kept in %s; --resume continues it", work)
    except OSError as exc:
        log.warning("could not clean up %s: %s", work, exc)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the renames are still atomic
    finally:
        os.close(fd)


def _swap_in(paths: RunPaths, outputs: frozenset[str]) -> None:
    """The two renames (and the carry-back), with Ctrl-C held until they are done."""
    with deferred_signals():
        if not os.path.lexists(paths.out):
            os.rename(paths.partial, paths.out)
            return
        shutil.copymode(paths.out, paths.partial)  # the replaced folder's permissions
        os.rename(paths.out, paths.trash)
        try:
            os.rename(paths.partial, paths.out)
        except OSError:
            os.rename(paths.trash, paths.out)
            raise
        _carry_back(paths.trash, paths.out, outputs)


def _publish(paths: RunPaths, outputs: frozenset[str]) -> None:
    """Replace ``out`` by the finished work folder (see the module docstring)."""
    try:
        if os.path.lexists(paths.trash):
            _remove(paths.trash)  # recovered at start; anything here now is debris
        _swap_in(paths, outputs)
        _fsync_dir(paths.out.parent)
        if os.path.lexists(paths.trash):
            _remove(paths.trash)
    except OSError as exc:
        raise RunDirError(
            f"could not publish the run to {paths.given!r} ({exc.strerror or exc}); the "
            f"finished run is kept in {str(paths.partial)!r}, and --resume publishes it"
        ) from None


def _claim(paths: RunPaths, overwrite: bool, resume: bool, inputs, extra_files, outputs):
    """Create the parent folders, lock, repair, decide and open the work folder; on any
    refusal, leave the disk as it was."""
    created = _make_parents(paths.out.parent, paths.given)
    lock = RunLock(paths.lock, paths.given)
    try:
        lock.acquire()
        _recover_trash(paths, outputs)
        # decided again under the lock: the disk may have changed since preflight
        mode = _decide(paths, overwrite, resume, inputs, extra_files, outputs)
        work, baseline = _open_work(paths, mode)
    except BaseException:
        lock.release()
        _remove_dirs(created)
        raise
    return lock, work, baseline


@contextmanager
def run_directory(
    out: Path | str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs=(),
    extra_files: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Own the run folder ``out`` for the block; yield the folder to write the run into.

    At start, before any compute: the checks of ``preflight`` (input protection, an earlier
    run without ``overwrite``, an interrupted run without ``resume`` or ``overwrite``, a
    corrupt state to resume, ``out`` under a file, an unwritable folder) and the lock (a
    second run into ``out`` is refused, naming the holder). A refusal leaves the disk as it
    was. ``resume``: continue the interrupted run (its partial folder), else the state of the
    run in ``out`` (copied, so ``out`` stays whole), else start fresh.

    On normal exit the work folder replaces ``out`` at once. On an exception it is kept when
    it holds a new checkpoint (``--resume`` continues it), else removed; the lock is always
    released. Raise nothing in the block for a run that succeeded (typer.Exit after it).
    """
    paths = preflight(
        out, overwrite=overwrite, resume=resume, inputs=inputs, extra_files=extra_files
    )
    outputs = output_names(paths.out, tuple(extra_files))
    lock, work, baseline = _claim(paths, overwrite, resume, inputs, extra_files, outputs)
    try:
        try:
            yield work
        except BaseException:
            _abandon(work, baseline)
            raise
        _publish(paths, outputs)
    finally:
        lock.release()
