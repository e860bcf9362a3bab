"""Resume: interrupt a recipe run anywhere, `--resume`, and end bit-identical to a straight run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prunekit.errors import RunDirError, SettingError
from prunekit.prune.state import load_step_state
from prunekit.recipe import load_recipe
from prunekit.recipe_run import run_recipe
from prunekit.rundir import partial_path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def recipe_tree(ckpt: Path, steps: int = STEPS, ntk: bool = False) -> dict:
    """obd on EKFAC (the kept eigenbasis is part of the state), sampled labels, tiny budgets."""
    return {
        "name": "resume",
        "seed": 0,
        "data": "digits",
        "model": {"checkpoint": str(ckpt)},
        "criterion": {"name": "obd", "fisher": "ekfac", "labels": "sampled", "score_examples": 200},
        "schedule": {"final": 0.9, "steps": steps, "kind": "exp"},
        "finetune": {"lr": 0.05, "batch_size": 50, "epochs_per_step": 0.5, "final_epochs": 2},
        "analysis": {"ntk": ntk, "ntk_every": "1000000"},
        "checks": {"min_sparsity": 0.85},
    }


def read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def outcome(out: Path) -> dict:
    """Everything a run leaves that must not depend on interruptions (timings removed)."""
    report = json.loads((out / "report.json").read_text())
    report.pop("seconds")
    for row in report["steps"]:
        row.pop("seconds")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        row.pop("seconds")
    ntk = out / "ntk.jsonl"
    return {
        "model": read_st(out / "model.safetensors"),
        "masks": read_st(out / "masks.safetensors"),
        "metrics": metrics,
        "report": report,
        "ntk": ntk.read_text() if ntk.exists() else None,
    }


def assert_same_run(got: Path, want: dict) -> None:
    have = outcome(got)
    for kind in ("model", "masks"):
        tensors, meta = have[kind]
        ref, ref_meta = want[kind]
        assert meta == ref_meta, kind
        assert tensors.keys() == ref.keys(), kind
        for name, t in ref.items():
            assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), (kind, name)
    assert have["metrics"] == want["metrics"]
    assert have["report"] == want["report"]
    assert have["ntk"] == want["ntk"]


def assert_clean_interrupt(out: Path, step: int | None) -> None:
    """No finished-run file, no temporary file; state/latest.json at ``step`` (None: absent)."""
    for name in ("report.json", "model.safetensors", "masks.safetensors", "metrics.jsonl"):
        assert not (out / name).exists(), name
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    state = load_step_state(out)
    if step is None:
        assert state is None
        return
    tensors, info = state
    assert info["step"] == step
    assert [p.name for p in (out / "state").glob("step-*")] == [f"step-{step:05d}.safetensors"]
    assert len(info["rows"]) == step + 1  # dense row + one per finished step
    assert any(k.startswith("cache/") for k in tensors) and "layers" in info["cache"]


class InterruptAt:
    """A progress callback raising KeyboardInterrupt when ``label`` reports ``done``."""

    def __init__(self, label: str, done: int):
        self.label, self.done, self.fired = label, done, False

    def __call__(self, label: str, done: int, total: int) -> None:
        if label == self.label and done == self.done and not self.fired:
            self.fired = True
            raise KeyboardInterrupt(f"test: {label} {done}/{total}")


def interrupted(recipe: dict, out: Path, label: str, done: int) -> None:
    stop = InterruptAt(label, done)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, progress=stop)
    assert stop.fired


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, digits_model_file) -> Path:
    path = tmp_path_factory.mktemp("resume") / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(digits_model_file), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(recipe_file) -> dict:
    """The uninterrupted run."""
    out = recipe_file.parent / "reference"
    run_recipe(load_recipe(recipe_file), out)
    return {"out": out, **outcome(out)}


# random step k of STEPS, drawn reproducibly; every phase of a step and the final fine-tune
K = random.Random(2024).randint(2, STEPS)
CASES = {
    "scoring step 1 (no checkpoint yet)": ("score", 1, None),
    f"scoring step {K} (random)": ("score", K, K - 1),
    "mid fine-tune of step 2": ("fine-tune step 2", 3, 1),
    "step 3 finished, not yet saved": ("steps", 3, 2),
    "mid final fine-tune": ("final fine-tune", 5, STEPS),
}


@pytest.mark.parametrize("case", CASES)
def test_interrupt_then_resume_is_bit_identical(tmp_path, recipe_file, reference, case):
    label, done, saved = CASES[case]
    recipe = load_recipe(recipe_file)
    out = tmp_path / "run"
    interrupted(recipe, out, label, done)
    assert_clean_interrupt(out, saved)
    report, checks = run_recipe(recipe, out, resume=True)
    assert checks == reference["report"]["checks"]
    assert_same_run(out, reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_interrupted_twice_then_resumed(tmp_path, recipe_file, reference):
    recipe = load_recipe(recipe_file)
    out = tmp_path / "run"
    interrupted(recipe, out, "steps", 2)
    assert_clean_interrupt(out, 1)
    stop = InterruptAt("fine-tune step 4", 2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, resume=True, progress=stop)
    assert_clean_interrupt(out, 3)
    run_recipe(recipe, out, resume=True)
    assert_same_run(out, reference)


def test_resume_needs_the_kept_eigenbasis(tmp_path, recipe_file, reference):
    """Negative control: without the checkpointed EKFAC basis the resumed run differs
    (resumed at step 2, where the straight run keeps its basis: 0.56 of the weights left,
    above refit_basis_below 0.5 of the dense model's)."""
    recipe = load_recipe(recipe_file)
    out = tmp_path / "run"
    interrupted(recipe, out, "score", 2)
    latest = out / "state" / "latest.json"
    info = json.loads(latest.read_text())
    tensors = load_file(str(out / "state" / info["tensors"]))
    save_file({k: v for k, v in tensors.items() if not k.startswith("cache/")},
              str(out / "state" / info["tensors"]),
              metadata={"prunekit.kind": "state", "prunekit.step": str(info["step"])})  # fmt: skip
    info["cache"] = {"ekfac_step": None}
    latest.write_text(json.dumps(info))
    run_recipe(recipe, out, resume=True)
    masks, _ = read_st(out / "masks.safetensors")
    ref, _ = reference["masks"]
    assert not all(torch.equal(masks[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    ("key", "value"),
    [("ekfac_kept", "os.system"), ("ekfac_kept", 1.5), ("ekfac_kept", True), ("ekfac_step", -1)],
)
def test_a_damaged_basis_record_is_refused_in_one_line(tmp_path, recipe_file, key, value):
    """latest.json is untrusted: the EKFAC cache's step and kept fraction are checked."""
    recipe = load_recipe(recipe_file)
    out = tmp_path / "run"
    interrupted(recipe, out, "score", 2)
    latest = out / "state" / "latest.json"
    info = json.loads(latest.read_text())
    assert info["cache"]["ekfac_kept"] == 1.0  # the dense model's basis, kept at step 1
    info["cache"][key] = value
    latest.write_text(json.dumps(info))
    with pytest.raises(RunDirError, match=f"{key} {value!r}".replace("(", r"\(")) as caught:
        run_recipe(recipe, out, resume=True)
    assert "\n" not in str(caught.value) and "latest.json" in str(caught.value)
    assert not (out / "report.json").exists()


def test_resume_of_a_finished_run_reproduces_it(tmp_path, recipe_file, reference):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    run_recipe(load_recipe(recipe_file), out, resume=True)
    assert_same_run(out, reference)


def test_resume_with_ntk_is_bit_identical(tmp_path, digits_model_file):
    path = tmp_path / "ntk.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(digits_model_file, steps=2, ntk=True)))
    recipe = load_recipe(path)
    run_recipe(recipe, tmp_path / "ref")
    want = outcome(tmp_path / "ref")
    assert want["ntk"] and len(want["ntk"].splitlines()) == 6  # dense, 2 x (prune, ft), final
    out = tmp_path / "run"
    interrupted(recipe, out, "fine-tune step 2", 2)
    assert_clean_interrupt(out, 1)
    assert len(load_step_state(out)[1]["ntk"]) == 3  # dense + step 1's two records
    run_recipe(recipe, out, resume=True)
    assert_same_run(out, want)


# ------------------------------------------------------------------ refusals


@pytest.fixture
def half_run(tmp_path, recipe_file) -> Path:
    out = tmp_path / "run"
    interrupted(load_recipe(recipe_file), out, "score", 3)
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_changed_recipe_is_refused_on_resume(cli, half_run, recipe_file):
    before = snapshot(half_run)
    code, stdout, stderr = cli(
        "run", recipe_file, "--out", half_run, "--resume", "--quiet", "--set", "finetune.lr=0.02"
    )
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "finetune.lr" in stderr
    assert snapshot(half_run) == before
    with pytest.raises(SettingError) as info:
        run_recipe(load_recipe(recipe_file, ["finetune.lr=0.02", "seed=1"]), half_run, resume=True)
    assert "finetune.lr" in str(info.value) and "seed" in str(info.value)
    assert "schedule" not in str(info.value)
    assert snapshot(half_run) == before


def test_run_on_a_checkpoint_needs_resume_or_overwrite(cli, half_run, recipe_file, reference):
    before = snapshot(half_run)
    code, _, stderr = cli("run", recipe_file, "--out", half_run, "--quiet")
    assert code == 2 and "--overwrite" in stderr and "state/latest.json" in stderr
    assert snapshot(half_run) == before
    code, _, stderr = cli("run", recipe_file, "--out", half_run, "--quiet", "--overwrite")
    assert code == 0, stderr
    assert_same_run(half_run, reference)


# ------------------------------------------------------------------ a real process and SIGINT


def start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as conftest's torch
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prunekit",
            "run",
            str(recipe),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if we ignore it
    )


def test_sigint_after_a_checkpoint_exits_130_and_resumes(tmp_path, recipe_file, reference):
    out = tmp_path / "run"
    proc = start(recipe_file, out)
    work = partial_path(out)  # the CLI writes aside and publishes `out` only when done
    latest = work / "state" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert latest.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = json.loads(latest.read_text())["step"]
    assert 1 <= step < STEPS  # stopped mid-run, after the first checkpoint
    assert stderr.strip() == (
        f"error: interrupted after step {step} of {STEPS}; resume with prunekit run "
        f"{recipe_file} --out {out} --resume"
    )
    assert not out.exists()  # nothing half-written is ever visible as the run
    assert_clean_interrupt(work, step)
    code = start(recipe_file, out).wait(timeout=60)  # without --resume: refused, says so
    assert code == 2 and not out.exists()
    proc = start(recipe_file, out, "--resume")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert_same_run(out, reference)


def test_distillation_resumes_bit_identical_with_its_cached_teacher(tmp_path):
    """An example model is rebuilt untrained on resume: the dense outputs must come from the
    run's cache, not from the weights at hand."""
    tree = {
        "name": "distill-resume", "seed": 0, "data": "synthetic?n=300&dim=64&classes=10",
        "model": {"example": "mlp-digits"},
        "task": {"loss": "distill", "distill_metric": "kl"},
        "criterion": {"name": "obd", "fisher": "ekfac", "score_examples": 100},
        "schedule": {"final": 0.8, "steps": 3, "kind": "exp"},
        "finetune": {"lr": 0.05, "batch_size": 50, "epochs_per_step": 0.5, "final_epochs": 1},
        "analysis": {"ntk": False},
    }  # fmt: skip
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    recipe = load_recipe(path)
    run_recipe(recipe, tmp_path / "ref")
    want = outcome(tmp_path / "ref")
    out = tmp_path / "run"
    interrupted(recipe, out, "score", 2)
    assert (out / "state" / "teacher.safetensors").is_file()
    run_recipe(recipe, out, resume=True)
    assert_same_run(out, want)
    assert want["report"]["metrics"]["finetuned"]["agreement"] > 0.5
    (out / "state" / "teacher.safetensors").unlink()  # a resumable state without its teacher
    interrupted(recipe, tmp_path / "again", "score", 2)
    (tmp_path / "again" / "state" / "teacher.safetensors").unlink()
    with pytest.raises(SettingError, match="cannot resume this distillation run"):
        run_recipe(recipe, tmp_path / "again", resume=True)
