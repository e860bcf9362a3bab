"""Fixtures of the fuzz suite (issue 13): the real CLI in child processes, tree snapshots.

Every case runs ``prunekit.cli.main()`` with a real ``sys.argv`` in its own process, with
the case folder as working directory, its own stdout/stderr files, a wall-clock limit and a
memory limit. Starting a fresh interpreter costs ~2 s (torch, typer, rich), so the cases are
forked from one *fork server*: a fresh interpreter started once per session that imports
prunekit and its heavy dependencies and then forks one child per case. A child is a real
process (own pid, cwd, file descriptors, exit status; a payload that runs touches only the
child), and it sees ``sys.path`` as the ``prunekit`` console script does (no '' entry; the
CLI adds the working folder itself). A few cases (signals, concurrency, a fresh-interpreter
cross-check of the hostile files) start the ``prunekit`` console script itself.

Bytecode caches are off (PYTHONDONTWRITEBYTECODE) so importing a user's module from the
case folder writes nothing there that the CLI did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "mlp-digits"
EXAMPLE_ARCH = "prunekit.models:mlp?sizes=64,128,64,10&act=tanh"
MEMORY_HEADROOM = 6 << 30  # bytes of address space a child may add to what the server maps


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: fuzz cases that start several real processes (signals, concurrency)"
    )


# ------------------------------------------------------------------ processes


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile: no spinning on 2 cores
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONPATH", None)
    env["COLUMNS"] = "100"
    return env


def prunekit_command() -> list[str]:
    """How a user starts the CLI: the console script beside this interpreter.

    (``python -m prunekit.cli`` does nothing: cli.py has no ``__main__`` block; ``python -m
    prunekit`` would also put the working folder first on sys.path, which the script does not.)
    """
    script = Path(sys.executable).with_name("prunekit")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "prunekit"]


@dataclass
class Result:
    """What one CLI process did."""

    code: int | None  # exit status; -N when killed by signal N; None when it timed out
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def describe(self) -> str:
        def clip(text: str, n: int = 1500) -> str:
            return text if len(text) <= n else text[:700] + "\n[...]\n" + text[-700:]

        state = "timed out" if self.timed_out else f"exit {self.code}"
        return (
            f"{state} after {self.seconds:.2f} s\n--- stdout ---\n{clip(self.stdout)}"
            f"\n--- stderr ---\n{clip(self.stderr)}"
        )


SERVER_SOURCE = r"""
import json, os, resource, signal, sys, time, traceback
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
sys.dont_write_bytecode = True
import importlib
PRELOAD = [
    "torch", "numpy", "yaml", "safetensors", "safetensors.torch", "typer", "rich",
    "sklearn.datasets", "matplotlib", "matplotlib.pyplot", "onnx", "onnxruntime",
    "prunekit", "prunekit.cli", "prunekit.checkpoint", "prunekit.data", "prunekit.recipe",
    "prunekit.pipeline", "prunekit.tasks", "prunekit.prune.state", "prunekit.analysis",
    "prunekit.export", "prunekit.models", "prunekit.criteria", "prunekit.finetune",
]
failed = []
for name in PRELOAD:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
import contextlib, io
saved_path = list(sys.path)
try:  # the first call of the CLI builds typer/click/rich state: pay for it once, here
    from prunekit.cli import main
    import torch
    torch.nn.Linear(4, 4)(torch.zeros(2, 4)).sum()
    for argv in (["prune", "/nonexistent/m.pt", "--out", "/nonexistent/run"],
                 ["validate", "/nonexistent/r.yaml"], ["plot", "/nonexistent/run"],
                 ["export", "/nonexistent/m.pt", "--out", "/nonexistent/m.onnx"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except BaseException:
                pass
except Exception as exc:
    failed.append(f"warm-up: {type(exc).__name__}: {exc}")
sys.path[:] = saved_path
import threading
chan_out = os.fdopen(os.dup(1), "w")
chan_in = os.fdopen(os.dup(0), "r")
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0

def child(req):
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                               (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                               (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, mode, 0o644)
            os.dup2(new, fd)
            os.close(new)
        if req.get("memory"):
            limit = vm_size() + req["memory"]
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ["prunekit", *req["argv"]]
        import torch
        torch.set_num_threads(1)
        from prunekit.cli import main
        try:
            main()
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)

chan_out.write(json.dumps({"ready": True, "failed": failed,
                           "threads": threading.active_count()}) + "\n")
chan_out.flush()
for line in chan_in:
    req = json.loads(line)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req)
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > req["timeout"]:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.003)
    seconds = time.monotonic() - start
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the case left running (a payload's shell)
    except (ProcessLookupError, PermissionError):
        pass
    code = os.waitstatus_to_exitcode(status)
    chan_out.write(json.dumps({"code": None if timed_out else code,
                               "timed_out": timed_out, "seconds": seconds}) + "\n")
    chan_out.flush()
"""


class ForkServer:
    """A preloaded interpreter that forks one CLI process per request (see module doc)."""

    def __init__(self, io_dir: Path):
        self.io_dir = io_dir
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=io_dir,
            env=child_env(),
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("the fuzz fork server did not start")
        self.info = json.loads(hello)

    def run(self, argv, cwd: Path, timeout: float = 30.0, memory: int | None = MEMORY_HEADROOM):
        tag = uuid.uuid4().hex
        out, err = self.io_dir / f"{tag}.out", self.io_dir / f"{tag}.err"
        request = {
            "argv": [str(a) for a in argv],
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
            "timeout": timeout,
            "memory": memory,
        }
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the fuzz fork server died")
        got = json.loads(reply)
        result = Result(
            got["code"],
            out.read_text(errors="replace") if out.exists() else "",
            err.read_text(errors="replace") if err.exists() else "",
            got["seconds"],
            got["timed_out"],
        )
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_fresh(argv, cwd: Path, timeout: float = 60.0) -> Result:
    """Run the ``prunekit`` console script itself (a fresh interpreter)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [*prunekit_command(), *[str(a) for a in argv]],
            cwd=cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return Result(None, out or "", err or "", time.monotonic() - start, True)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def start_fresh(argv, cwd: Path) -> subprocess.Popen:
    """Start the console script without waiting (signals, concurrency)."""
    return subprocess.Popen(
        [*prunekit_command(), *[str(a) for a in argv]],
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("fuzz-io"))
    yield srv
    srv.close()


# ------------------------------------------------------------------ snapshots


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: folders by name, files by (size, mtime_ns, sha256), links
    by target. Symlinks are not followed."""
    state: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return state
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                state[rel] = ("file", st.st_size, st.st_mtime_ns, _digest(path))
            else:  # a FIFO or socket a case planted: never opened
                state[rel] = ("special", stat.S_IFMT(st.st_mode), st.st_mtime_ns)
    return state


def tree_diff(before: dict, after: dict) -> list[str]:
    """Readable differences between two ``tree_state`` results (empty when equal)."""
    lines = [f"created {k}" for k in sorted(set(after) - set(before))]
    lines += [f"removed {k}" for k in sorted(set(before) - set(after))]
    lines += [
        f"changed {k}: {before[k][:2]} -> {after[k][:2]}"
        for k in sorted(set(before) & set(after))
        if before[k] != after[k]
    ]
    return lines


# ------------------------------------------------------------------ shared fixtures


@dataclass
class Assets:
    """Files built once per session; cases copy them, never modify them."""

    root: Path
    dense: Path  # the mlp-digits example: prunekit safetensors with arch + data metadata
    resume_run: Path  # a finished 2-step run of resume_recipe() (state/ kept)
    resume_tree: dict = field(default_factory=dict)


def resume_recipe_tree(dense: Path, steps: int = 2, **extra) -> dict:
    """A cheap recipe on the dense example (absolute checkpoint path: the recipe hash does not
    depend on where the recipe file lies, so a copied run resumes)."""
    tree = {
        "name": "fuzz",
        "seed": 0,
        "data": "digits",
        "model": {"checkpoint": str(dense)},
        "criterion": {"name": "magnitude"},
        "schedule": {"final": 0.5, "steps": steps},
        "finetune": {"epochs_per_step": 0, "final_epochs": 0},
        "analysis": {"ntk": False},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


@pytest.fixture(scope="session")
def assets(tmp_path_factory, server) -> Assets:
    import yaml

    root = tmp_path_factory.mktemp("fuzz-assets")
    dense = root / "dense.safetensors"
    got = server.run(["example", EXAMPLE, "--out", dense, "--quiet"], cwd=root, timeout=300)
    assert got.code == 0 and dense.is_file(), "prunekit example failed:\n" + got.describe()
    tree = resume_recipe_tree(dense)
    recipe = root / "resume.yaml"
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    run = root / "resume-run"
    got = server.run(["run", recipe, "--out", run, "--quiet"], cwd=root, timeout=300)
    assert got.code == 0, "the resume template run failed:\n" + got.describe()
    assert (run / "state" / "latest.json").is_file(), sorted(os.listdir(run))
    recipe.unlink()
    shutil.rmtree(run / "plots", ignore_errors=True)
    return Assets(root, dense, run, tree)


# ------------------------------------------------------------------ cases


@dataclass
class Case:
    """One bad or hostile invocation and what it must end in.

    argv: the CLI arguments (run with the case folder as working directory); code: the exit
    status (2 = user error); expect: texts the one error line must contain; expect_any: at
    least one of these must be in it; markers: files a payload would create if it ran;
    timeout: wall-clock limit of the process; max_seconds: how long it may take;
    max_lines: limit on stdout + stderr lines together; fresh: start the console script
    instead of forking from the server.
    """

    argv: list
    code: int = 2
    expect: tuple = ()
    expect_any: tuple = ()
    markers: tuple = ()
    timeout: float = 30.0
    max_seconds: float | None = None
    max_lines: int | None = None
    fresh: bool = False


class Ctx:
    """A case's folders: ``dir`` (the working directory, holding the fixtures) inside
    ``root`` (the pytest tmp_path, snapshotted whole); ``outside`` is a sibling of ``dir``
    for files a hostile input points at from outside the case folder."""

    def __init__(self, root: Path, assets: Assets):
        self.root = root
        self.dir = root / "case"
        self.outside = root / "outside"
        self.dir.mkdir(parents=True)
        self.outside.mkdir()
        self.assets = assets

    def path(self, name: str) -> Path:
        return self.dir / name

    def marker(self, tag: str = "") -> Path:
        """Absolute path of a file only a payload that ran would create."""
        return self.root / f"PWNED{tag}"

    def write(self, name: str, data) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
        return name

    def model(self, name: str = "dense.safetensors") -> str:
        """A copy of the dense example checkpoint (arch and data in its metadata)."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.assets.dense, path)
        return name

    def dense_state(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.assets.dense))

    def safetensors(self, name: str, tensors: dict | None = None, meta: dict | None = None) -> str:
        from safetensors.torch import save_file

        tensors = self.dense_state() if tensors is None else tensors
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, str(self.dir / name), metadata=meta)
        return name

    def recipe(self, tree, name: str = "recipe.yaml") -> str:
        import yaml

        text = tree if isinstance(tree, (str, bytes)) else yaml.safe_dump(tree, sort_keys=False)
        return self.write(name, text)

    def module(self, name: str, source: str) -> str:
        """A Python module in the case folder (importable as ``name`` from there)."""
        return self.write(f"{name}.py", source)


def judge(case: Case, res: Result, changes: list[str]) -> list[str]:
    """Every way the run broke the contract; empty when it kept it."""
    problems = []
    if res.timed_out:
        problems.append(f"did not finish within {case.timeout:g} s (killed)")
    for marker in case.markers:
        if os.path.lexists(marker):
            problems.append(f"PAYLOAD RAN: {Path(marker).name} was created")
    text = res.stdout + res.stderr
    if "Traceback" in text:
        tail = [ln for ln in text.splitlines() if ln.strip()]
        problems.append(f"traceback ending in {tail[-1][:200]!r}")
    if not res.timed_out and res.code != case.code:
        problems.append(f"exit {res.code}, expected {case.code}")
    lines = res.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith("error:"):
        first = next((ln for ln in lines if ln.strip()), "")
        problems.append(
            f"stderr has {len(lines)} lines, not one 'error:' line (first: {first[:160]!r})"
        )
    if res.stdout.strip():
        out = res.stdout.strip().splitlines()
        problems.append(f"stdout not empty ({len(out)} lines; first: {out[0][:120]!r})")
    line = lines[0] if len(lines) == 1 else res.stderr
    missing = [t for t in case.expect if t not in line]
    if missing and lines:
        problems.append(f"error line lacks {missing}")
    if case.expect_any and lines and not any(t in line for t in case.expect_any):
        problems.append(f"error line names none of {list(case.expect_any)}")
    if case.max_seconds is not None and not res.timed_out and res.seconds > case.max_seconds:
        problems.append(f"took {res.seconds:.1f} s (limit {case.max_seconds:g} s)")
    n_lines = len(res.stdout.splitlines()) + len(lines)
    if case.max_lines is not None and n_lines >= case.max_lines:
        problems.append(f"{n_lines} lines of output (limit < {case.max_lines})")
    problems += changes
    return problems


def run_case(ctx: Ctx, case: Case, server: ForkServer) -> Result:
    """Run ``case`` in ``ctx`` and assert the whole contract (see ``judge``)."""
    before = tree_state(ctx.root)
    before_assets = tree_state(ctx.assets.root)
    if case.fresh:
        res = run_fresh(case.argv, ctx.dir, timeout=case.timeout)
    else:
        res = server.run(case.argv, ctx.dir, timeout=case.timeout)
    changes = [f"tmp tree: {d}" for d in tree_diff(before, tree_state(ctx.root))]
    after_assets = tree_state(ctx.assets.root)
    changes += [f"OUTSIDE the case: {d}" for d in tree_diff(before_assets, after_assets)]
    problems = judge(case, res, changes[:12])
    argv = " ".join(str(a) for a in case.argv)
    assert not problems, (
        f"prunekit {argv[:300]}\n  - " + "\n  - ".join(problems) + "\n" + res.describe()
    )
    return res


@pytest.fixture
def ctx(tmp_path, assets) -> Ctx:
    return Ctx(tmp_path, assets)
