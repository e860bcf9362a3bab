"""Run outputs follow the umask, and `prunekit run` never overwrites its input checkpoint."""

from __future__ import annotations

import hashlib
import os
import stat

import torch

from prunekit.checkpoint import ARCH_KEY, build_model
from prunekit.cli import main
from prunekit.prune.state import save_masks, save_tensors, write_json

ARCH = "prunekit.models:mlp?sizes=64,16,10&act=tanh"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        model = build_model(ARCH)
        save_tensors(tmp_path / "model.safetensors", model.state_dict(), {ARCH_KEY: ARCH})
        masks = {"1.weight": torch.ones(16, 64, dtype=torch.bool)}
        save_masks(tmp_path / "masks.safetensors", masks, {})
        write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("model.safetensors", "masks.safetensors", "report.json"):
        assert _mode(tmp_path / name) == 0o644, name


def test_run_refuses_to_overwrite_its_input_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run1"
    run_dir.mkdir()
    checkpoint = run_dir / "model.safetensors"
    meta = {ARCH_KEY: ARCH, "prunekit.data": "digits"}
    save_tensors(checkpoint, build_model(ARCH).state_dict(), meta)
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: digits\nmodel:\n  checkpoint: run1/model.safetensors\n"
        "schedule:\n  final: 0.5\n  steps: 1\nfinetune:\n  epochs_per_step: 0\n"
        "  final_epochs: 0\ncriterion:\n  name: magnitude\n"
    )
    for extra in ([], ["--resume"]):
        code = main(["run", str(recipe), "--out", str(run_dir), "--overwrite", "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "would overwrite the input" in err[0]
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
