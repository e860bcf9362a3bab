"""Shared fixtures: a tiny model trained on digits (once per session) and a CLI runner."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from prunekit.checkpoint import ARCH_KEY, build_model
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, finetune
from prunekit.prune.state import save_tensors
from prunekit.types import ClassificationTask

DIGITS_ARCH = "prunekit.models:mlp?sizes=64,32,10&act=tanh"

# Every test model is tiny: intra-op threads only add spin-waiting, which costs 10-1000x per
# op when the 2 cores are shared with other processes. One thread keeps timings stable.
torch.set_num_threads(1)


def run_main(args: list[str]) -> tuple[int, str, str]:
    """Run ``prunekit.cli.main(args)`` in-process; (exit code, stdout, stderr)."""
    from prunekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def digits_model_file(tmp_path_factory) -> Path:
    """A 64-32-10 tanh MLP trained briefly on digits, as prunekit safetensors.

    The metadata names its arch and data, so `prunekit prune FILE` needs neither. Tests must
    not modify the file (copy it first).
    """
    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    model = build_model(DIGITS_ARCH)
    gen = torch.Generator().manual_seed(0)
    settings = FinetuneSettings(epochs=3, lr=0.1, weight_decay=0.0)
    finetune(model, ClassificationTask(), data.train_batches(50, gen), settings)
    path = tmp_path_factory.mktemp("digits_model") / "dense.safetensors"
    save_tensors(path, model.state_dict(), {ARCH_KEY: DIGITS_ARCH, "prunekit.data": "digits"})
    return path


@pytest.fixture(scope="session")
def cli():
    """The in-process CLI: ``cli(*args) -> (exit code, stdout, stderr)``."""
    return lambda *args: run_main(list(args))
