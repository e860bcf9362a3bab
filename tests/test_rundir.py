"""The run directory as a unit (prunekit.rundir): checks at start, the lock, atomic publish,
interrupted runs and resume, and that every refusal leaves the disk as it was."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from prunekit.errors import RunDirError
from prunekit.prune.runlock import RunLock, lock_holder
from prunekit.prune.state import load_step_state, save_step_state, write_json
from prunekit.rundir import (
    RUN_OUTPUTS,
    output_names,
    partial_path,
    preflight,
    run_directory,
    run_paths,
)

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (names, file bytes, link targets), links not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "dir"
    return found


def write_run(folder: Path, tag: str, step: int | None = 1) -> None:
    """A stand-in for a run: report.json tagged ``tag`` and, unless None, a checkpoint."""
    if step is not None:
        save_step_state(folder, step, {"x": torch.full((2,), float(step))}, {"tag": tag})
    write_json(folder / "report.json", {"tag": tag})


def tag_of(folder: Path) -> str:
    return json.loads((folder / "report.json").read_text())["tag"]


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


# ------------------------------------------------------------------ publish


def test_the_run_folder_appears_only_when_the_run_ends(tmp_path):
    out = tmp_path / "runs" / "a"
    with run_directory(out) as work:
        assert work == partial_path(out) == tmp_path / "runs" / ".a.prunekit-partial"
        assert not out.exists() and work.is_dir()
        lock = json.loads((tmp_path / "runs" / ".a.prunekit-lock").read_text())
        assert lock["pid"] == os.getpid() and lock["started"]
        write_run(work, "new")
        assert not out.exists()
    assert tag_of(out) == "new" and load_step_state(out)[1]["step"] == 1
    assert siblings(out) == ["a"]  # no partial, lock or trash left


def test_overwrite_replaces_the_run_and_keeps_the_users_own_files(tmp_path):
    out = tmp_path / "run"
    write_run(out, "old", step=3)
    (out / "plots").mkdir()
    (out / "plots" / "old.png").write_bytes(b"png")
    (out / "model.onnx").write_bytes(b"old onnx")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "input.npz").write_bytes(b"input")
    inode = (out / "data" / "input.npz").stat().st_ino
    out.chmod(0o750)
    inputs = (out / "data" / "input.npz",)
    with run_directory(out, overwrite=True, inputs=inputs) as work:
        assert tag_of(out) == "old"  # the old run stays whole until the end
        write_run(work, "new", step=1)
    assert tag_of(out) == "new" and load_step_state(out)[1]["step"] == 1
    assert not (out / "plots").exists() and not (out / "model.onnx").exists()  # stale outputs
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "data" / "input.npz").stat().st_ino == inode  # moved back, never copied
    assert out.stat().st_mode & 0o777 == 0o750
    assert siblings(out) == ["run"]


def test_an_existing_folder_without_a_run_is_used_and_its_files_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README").write_text("keep")
    with run_directory(out) as work:
        write_run(work, "new")
    assert tag_of(out) == "new" and (out / "README").read_text() == "keep"


def test_a_reader_sees_the_old_run_or_the_new_one_never_a_half_written_one(tmp_path):
    out = tmp_path / "run"
    write_run(out, "old")
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(out, os.O_RDONLY)
            except FileNotFoundError:
                continue  # the microseconds between the two renames
            try:
                names = os.listdir(fd)
                # a folder replaced (and being deleted) meanwhile is not what `out` shows
                current = os.path.samestat(os.fstat(fd), os.stat(out))
            except FileNotFoundError:
                current = False
            finally:
                os.close(fd)
            if current:
                seen.append("report.json" in names and "state" in names)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for k in range(20):
            with run_directory(out, overwrite=True) as work:
                for i in range(30):
                    (work / f"part-{i}.bin").write_bytes(b"x" * 1000)
                write_run(work, f"new-{k}")
    finally:
        stop.set()
        reader.join()
    assert seen and False not in seen
    assert tag_of(out) == "new-19"


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with run_directory(out) as work:
        write_run(work, "new")
    assert tag_of(out) == "new"


def test_a_symlinked_run_folder_is_replaced_where_it_points(tmp_path):
    real = tmp_path / "real"
    write_run(real, "old")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert run_paths(link).out == real.resolve()
    with run_directory(link, overwrite=True) as work:
        write_run(work, "new")
    assert link.is_symlink() and tag_of(link) == "new" and tag_of(real) == "new"


def test_output_names_include_extra_files_inside_the_run_only(tmp_path):
    out = tmp_path / "run"
    names = output_names(out, ("pruned.onnx", "pruned.onnx.json", str(tmp_path / "elsewhere.onnx")))
    assert "pruned.onnx" in names and "elsewhere.onnx" not in names
    assert {"state", "report.json", "plots", "model.safetensors"} <= RUN_OUTPUTS <= names


# ------------------------------------------------------------------ failures and resume


def test_a_failure_after_a_checkpoint_keeps_the_partial_for_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), run_directory(out) as work:
        save_step_state(work, 2, {"x": torch.ones(2)}, {"tag": "half"})
        raise KeyboardInterrupt
    assert not out.exists()
    assert siblings(out) == [".run.prunekit-partial"]  # the lock is released and removed
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as info:
        with run_directory(out):
            pass
    message = str(info.value)
    assert "an interrupted run exists at" in message and str(partial_path(out)) in message
    assert "--resume continues it" in message and "--overwrite discards it" in message
    assert snapshot(tmp_path) == before
    with run_directory(out, resume=True) as work:
        assert work == partial_path(out)
        tensors, info = load_step_state(work)
        assert info["step"] == 2 and info["tag"] == "half"
        write_run(work, "resumed", step=3)
    assert tag_of(out) == "resumed" and siblings(out) == ["run"]


def test_overwrite_discards_an_interrupted_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), run_directory(out) as work:
        save_step_state(work, 2, {"x": torch.ones(2)}, {})
        raise RuntimeError("boom")
    with run_directory(out, overwrite=True) as work:
        assert load_step_state(work) is None  # a fresh start, not the interrupted state
        write_run(work, "fresh")
    assert tag_of(out) == "fresh" and siblings(out) == ["run"]


def test_a_failure_before_any_checkpoint_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    write_run(out, "old")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError), run_directory(out, overwrite=True) as work:
        (work / "model.safetensors").write_bytes(b"half")
        raise ValueError("bad data")
    assert snapshot(tmp_path) == before  # old run intact, no partial, no lock


def test_resume_of_a_published_run_copies_its_state_and_keeps_it_whole(tmp_path):
    out = tmp_path / "run"
    write_run(out, "old", step=4)
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), run_directory(out, resume=True) as work:
        assert load_step_state(work)[1]["step"] == 4
        raise RuntimeError("recipe changed")  # refused by the resume code: no new checkpoint
    assert snapshot(tmp_path) == before
    with run_directory(out, resume=True) as work:
        assert snapshot(out) == before_run(before)  # untouched while the resume works
        write_run(work, "resumed", step=5)
    assert tag_of(out) == "resumed" and (out / "notes.txt").read_text() == "mine"
    assert load_step_state(out)[1]["step"] == 5


def before_run(tree: dict) -> dict:
    return {k[len("run/") :]: v for k, v in tree.items() if k.startswith("run/")}


def test_resume_with_nothing_to_resume_starts_fresh_and_still_protects_a_run(tmp_path):
    out = tmp_path / "run"
    with run_directory(out, resume=True) as work:
        assert load_step_state(work) is None
        write_run(work, "fresh", step=None)
    with pytest.raises(RunDirError, match="holds an earlier run"):
        with run_directory(out, resume=True):
            pass


def test_resume_of_a_finished_run_without_state_says_there_is_nothing_to_resume(tmp_path):
    out = tmp_path / "run"
    write_run(out, "old", step=None)  # a finished run whose state/ was removed
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as info:
        with run_directory(out, resume=True):
            pytest.fail("the block must not run")
    message = str(info.value)
    assert "nothing to resume" in message and "state/latest.json" in message
    assert "--overwrite" in message and snapshot(tmp_path) == before
    with run_directory(out, resume=True, overwrite=True) as work:  # a fresh run replaces it
        write_run(work, "new")
    assert tag_of(out) == "new"


def test_resume_of_a_corrupt_partial_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), run_directory(out) as work:
        save_step_state(work, 2, {"x": torch.ones(2)}, {})
        raise RuntimeError
    latest = partial_path(out) / "state" / "latest.json"
    latest.write_text('{"step": 2, "tensors": "../../../etc/passwd"}')
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as info:
        with run_directory(out, resume=True):
            pytest.fail("the block must not run")
    assert str(latest) in str(info.value) and "'..'" in str(info.value)
    assert snapshot(tmp_path) == before


def test_a_publish_interrupted_between_its_renames_is_repaired(tmp_path):
    out = tmp_path / "run"
    trash = run_paths(out).trash
    write_run(trash, "old")  # as if the process died after `rename(out, trash)`
    with pytest.raises(RunDirError, match="holds an earlier run"):
        with run_directory(out):
            pass
    assert tag_of(out) == "old" and not trash.exists()  # the old run is back
    write_run(trash, "older")
    (trash / "notes.txt").write_text("mine")  # died after the second rename
    with run_directory(out, overwrite=True) as work:
        write_run(work, "new")
    assert tag_of(out) == "new" and (out / "notes.txt").read_text() == "mine"
    assert siblings(out) == ["run"]


def test_a_failed_publish_keeps_the_old_run_and_the_finished_partial(tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_run(out, "old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == partial_path(out):
            raise OSError(16, "Device or resource busy")
        real_rename(src, dst)

    monkeypatch.setattr("prunekit.rundir.os.rename", rename)
    with pytest.raises(RunDirError) as info:
        with run_directory(out, overwrite=True) as work:
            write_run(work, "new")
    assert "could not publish" in str(info.value) and str(partial_path(out)) in str(info.value)
    assert tag_of(out) == "old" and tag_of(partial_path(out)) == "new"
    monkeypatch.setattr("prunekit.rundir.os.rename", real_rename)
    with run_directory(out, resume=True) as work:
        assert tag_of(work) == "new"
    assert tag_of(out) == "new"


# ------------------------------------------------------------------ refusals at start


def make_earlier_run(tmp_path):
    write_run(tmp_path / "run", "old")
    return {"out": tmp_path / "run"}


def make_interrupted(tmp_path):
    write_run(partial_path(tmp_path / "run"), "half")
    return {"out": tmp_path / "run"}


def make_known_output(tmp_path):
    (tmp_path / "run" / "plots").mkdir(parents=True)
    return {"out": tmp_path / "run"}


def make_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return {"out": tmp_path / "file.txt" / "a" / "run"}


def make_out_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    return {"out": tmp_path / "run", "overwrite": True}


def make_input_in_state(tmp_path):
    write_run(tmp_path / "run", "old")
    return {"out": tmp_path / "run", "overwrite": True, "inputs": (tmp_path / "run" / "state",)}


def make_input_is_a_run_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"w")
    return {
        "out": tmp_path / "run",
        "overwrite": True,
        "inputs": (tmp_path / "run" / "model.safetensors",),
    }


def make_input_in_partial(tmp_path):
    model = partial_path(tmp_path / "run") / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"w")
    return {"out": tmp_path / "run", "overwrite": True, "inputs": (model,)}


def make_corrupt_published_state(tmp_path):
    write_run(tmp_path / "run", "old")
    (tmp_path / "run" / "state" / "latest.json").write_text("[]")
    return {"out": tmp_path / "run", "resume": True}


def make_long_name(tmp_path):
    return {"out": tmp_path / ("n" * 250)}


REFUSALS = [
    (make_earlier_run, "holds an earlier run (report.json, state/latest.json); pass --overwrite"),
    (make_interrupted, "an interrupted run exists at"),
    (make_known_output, "holds outputs of an earlier run (plots); pass --overwrite"),
    (make_under_a_file, "which is a file, not a folder"),
    (make_out_a_file, "is a file"),
    (make_input_in_state, "would replace the input"),
    (make_input_is_a_run_file, "would overwrite the input"),
    (make_input_in_partial, "would replace the input"),
    (make_corrupt_published_state, "JSON array, expected an object"),
    (make_long_name, "too long"),
]


@pytest.mark.parametrize(("make", "words"), REFUSALS, ids=[m.__name__[5:] for m, _ in REFUSALS])
def test_a_refusal_at_start_names_the_problem_and_writes_nothing(tmp_path, make, words):
    args = make(tmp_path)
    before = snapshot(tmp_path)
    for check in (preflight, run_directory):
        with pytest.raises(RunDirError) as info:
            with check(**args) if check is run_directory else _entered(check(**args)):
                pytest.fail("the block must not run")
        assert words in str(info.value) and "\n" not in str(info.value)
        assert snapshot(tmp_path) == before


class _entered:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def test_the_current_folder_is_never_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(RunDirError, match="current folder or contains it"):
            preflight(out, overwrite=True)
    with pytest.raises(RunDirError, match="root folder"):
        preflight("/", overwrite=True)


def test_a_read_only_folder_is_refused_at_start(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            # root writes through folder permissions; the unwritable case that holds for
            # root too is test_an_unwritable_system_folder_is_refused_at_start
            pytest.skip("running as root: chmod 0o555 does not stop writes")
        with pytest.raises(RunDirError, match="cannot write in the folder"):
            run_directory(folder / "run").__enter__()
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("system", ["/proc", "/sys"])
def test_an_unwritable_system_folder_is_refused_at_start(system):
    try:
        fd, probe = tempfile.mkstemp(dir=system)
    except OSError:
        pass  # unwritable even for root: the case this test needs
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip(f"{system} is writable here")
    out = Path(system) / "prunekit-test-run"
    with pytest.raises(RunDirError) as info:
        with run_directory(out):
            pytest.fail("the block must not run")
    assert f"cannot write in the folder {system!r}" in str(info.value)
    assert not out.exists()


def test_a_file_in_the_way_of_a_missing_parent_is_refused(tmp_path):
    (tmp_path / "a").write_text("file")
    with pytest.raises(RunDirError, match="is under '.*/a', which is a file"):
        with run_directory(tmp_path / "a" / "b" / "c" / "run"):
            pass
    assert (tmp_path / "a").read_text() == "file"


def test_symlinks_planted_at_prunekits_names_are_never_followed(tmp_path):
    out = tmp_path / "run"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_paths(out).lock.symlink_to(victim)  # would be truncated by a lock that follows it
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError, match="cannot lock"):
        with run_directory(out):
            pytest.fail("the block must not run")
    assert snapshot(tmp_path) == before and victim.read_text() == "precious"
    run_paths(out).lock.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    partial_path(out).symlink_to(elsewhere)  # would redirect the run's writes
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError, match="symbolic link, not prunekit's"):
        with run_directory(out, overwrite=True):
            pytest.fail("the block must not run")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ the lock


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with run_directory(out) as work:
        write_run(work, "first")
        assert str(os.getpid()) in lock_holder(run_paths(out).lock)
        before = snapshot(tmp_path)
        with pytest.raises(RunDirError) as info:
            with run_directory(out, overwrite=True):
                pytest.fail("the block must not run")
        message = str(info.value)
        assert "in use by another prunekit run" in message and f"pid {os.getpid()}" in message
        assert "started" in message and "\n" not in message
        assert snapshot(tmp_path) == before
    assert lock_holder(run_paths(out).lock) is None and tag_of(out) == "first"


def test_runlock_excludes_a_second_holder_and_removes_its_file(tmp_path):
    path = tmp_path / ".run.prunekit-lock"
    first = RunLock(path, "run").acquire()
    with pytest.raises(RunDirError, match="in use"):
        RunLock(path, "run").acquire()
    first.release()
    first.release()  # idempotent
    assert not path.exists()
    with RunLock(path, "run"):
        assert path.exists()
    assert not path.exists()


def test_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    run_paths(out).lock.write_text('{"pid": 999999, "started": "yesterday"}')
    assert lock_holder(run_paths(out).lock) is None
    with run_directory(out) as work:
        write_run(work, "new")
    assert tag_of(out) == "new" and not run_paths(out).lock.exists()


def test_the_holder_is_quoted_on_one_short_line_whatever_the_file_says(tmp_path):
    path = tmp_path / ".run.prunekit-lock"
    path.write_text(json.dumps({"pid": 7, "host": "evil\nerror: x" * 50, "started": "\n" * 9}))
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a foreign process's lock
        with pytest.raises(RunDirError) as info:
            RunLock(path, "run").acquire()
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
        assert "pid 7" in str(info.value)
        path.write_text("not json")
        with pytest.raises(RunDirError, match="holder not recorded yet"):
            RunLock(path, "run").acquire()
    finally:
        os.close(fd)


HOLDER = """
import sys, time
from pathlib import Path
import torch
from prunekit.errors import PrunekitError
from prunekit.prune.state import save_step_state
from prunekit.rundir import run_directory

out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "race":
    while not (out.parent / "go").exists():
        time.sleep(0.001)
try:
    with run_directory(out) as work:
        if mode == "checkpoint":
            save_step_state(work, 1, {"x": torch.ones(2)}, {"by": "child"})
        print("ready", flush=True)
        if mode == "race":
            time.sleep(2.0)
        else:
            sys.stdin.readline()
except PrunekitError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def spawn(out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), mode],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line == "ready\n", (line, proc.stderr.read() if proc.poll() is not None else "")


def test_another_process_holding_the_lock_blocks_until_it_ends(tmp_path):
    out = tmp_path / "run"
    child = spawn(out, "hold")
    try:
        wait_ready(child)
        with pytest.raises(RunDirError) as info:
            with run_directory(out):
                pytest.fail("the block must not run")
        assert f"pid {child.pid}" in str(info.value)
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0
    assert out.is_dir() and siblings(out) == ["run"]  # published, lock removed


def test_a_killed_holder_no_longer_blocks_and_its_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    child = spawn(out, "checkpoint")
    try:
        wait_ready(child)
        assert lock_holder(run_paths(out).lock) is not None
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert run_paths(out).lock.exists()  # stale file, but the kernel dropped the flock
    assert lock_holder(run_paths(out).lock) is None
    with pytest.raises(RunDirError, match="an interrupted run exists at .*--resume continues"):
        with run_directory(out):
            pass
    with run_directory(out, resume=True) as work:
        assert load_step_state(work)[1]["by"] == "child"
        write_run(work, "resumed", step=2)
    assert tag_of(out) == "resumed" and siblings(out) == ["run"]


def test_a_killed_holder_without_a_checkpoint_leaves_debris_that_is_cleared(tmp_path):
    out = tmp_path / "run"
    child = spawn(out, "hold")
    try:
        wait_ready(child)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=60)
    assert partial_path(out).is_dir()
    with run_directory(out) as work:  # no checkpoint: nothing to resume, no refusal
        write_run(work, "new")
    assert tag_of(out) == "new" and siblings(out) == ["run"]


def test_two_runs_started_at_once_do_not_both_succeed(tmp_path):
    out = tmp_path / "run"
    procs = [spawn(out, "race") for _ in range(2)]
    (tmp_path / "go").write_text("")
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert loser.count("\n") == 1 and loser.startswith("error: ")
    assert "in use by another prunekit run (pid" in loser, loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "run"]
