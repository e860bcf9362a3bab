"""The run-directory lock: an exclusive flock on a lock file that names its holder.

Two runs into the same ``--out`` must not both proceed. ``fcntl.flock`` (LOCK_EX |
LOCK_NB) on one lock file decides, and the kernel drops the lock when its holder dies
(SIGKILL included), so a crashed run never blocks the next one: its stale lock file is simply
locked again and rewritten. Where the file lives is the caller's choice (prunekit.rundir
puts it beside the run folder, see there why).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from datetime import datetime
from pathlib import Path

from prunekit.errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - prunekit runs on Linux and macOS
    fcntl = None

_LOCK_TRIES = 50
_UNKNOWN = "holder not recorded yet"  # an empty file: the holder is between flock and write
# never follow a symlink planted at the lock's name (it would truncate the file it points
# to); O_NONBLOCK so that a FIFO planted there cannot hang the open
_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def in_use(given: str, holder: str) -> RunDirError:
    """The refusal of a run into ``given`` while ``holder`` (see ``lock_holder``) runs."""
    return RunDirError(
        f"--out {given!r} is in use by another prunekit run ({holder}); wait for it to end "
        "or choose another --out"
    )


def _holder(fd: int) -> str:
    """The holder recorded in a lock file (untrusted text: parsed, typed, capped)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return _UNKNOWN
    if not isinstance(record, dict):
        return _UNKNOWN
    pid, started, host = record.get("pid"), record.get("started"), record.get("host", "?")
    if not (type(pid) is int and isinstance(started, str) and isinstance(host, str)):
        return _UNKNOWN
    return f"pid {pid} on {host[:64]!r}, started {started[:40]!r}"


def _recorded_holder(fd: int) -> str:
    """The holder, waiting up to ~0.2 s for a holder that has the flock but has not yet
    written its pid (the two steps cannot be one)."""
    for _ in range(40):
        holder = _holder(fd)
        if holder != _UNKNOWN:
            return holder
        time.sleep(0.005)
    return _holder(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


def lock_holder(path: Path) -> str | None:
    """Who holds the run lock at ``path``, or None when nobody does (writes nothing)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | _FLAGS)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return None


class RunLock:
    """An exclusive, non-blocking flock on a lock file that records its holder.

    ``acquire`` raises RunDirError naming the holder (pid, host, start time) when another
    process (or another RunLock in this one) holds it. ``release`` removes the file; the
    kernel releases the flock by itself if the process dies.
    """

    def __init__(self, path: Path, given: str):
        self.path, self.given, self.fd = Path(path), given, None

    def _lock_fd(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _FLAGS, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_holder(fd)
            os.close(fd)
            raise in_use(self.given, holder) from None
        except OSError:
            os.close(fd)
            raise
        if _same_file(fd, self.path):
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: retry
        return None

    def acquire(self) -> RunLock:
        """Take the lock and write this process's pid and start time into the file."""
        if fcntl is None:  # pragma: no cover
            raise RunDirError("run directories need fcntl.flock (Linux or macOS)")
        fd = None
        try:
            for _ in range(_LOCK_TRIES):
                fd = self._lock_fd()
                if fd is not None:
                    break
        except OSError as exc:
            raise RunDirError(
                f"cannot lock {str(self.path)!r} for --out {self.given!r} "
                f"({exc.strerror or exc}); choose a writable local folder"
            ) from None
        if fd is None:
            raise RunDirError(f"cannot lock {str(self.path)!r}: it keeps being replaced")
        self.fd = fd
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as exc:
            self.release()
            raise RunDirError(
                f"cannot write {str(self.path)!r} ({exc.strerror or exc}); free some space"
            ) from None
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a dead file) and
        close it, which releases the flock. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # a leftover lock file blocks no one once the flock is gone
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
