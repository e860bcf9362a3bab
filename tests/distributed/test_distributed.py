"""Multi-process pruning on torch.distributed (gloo, CPU): same masks as one process,
all-reduced statistics equal single-process ones, only rank 0 publishes, a failing rank
fails the job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import prunekit.cli as cli
import prunekit.cli_prune as cli_prune
from prunekit.checkpoint import ARCH_KEY
from prunekit.criteria import fit_curvature, mean_gradient
from prunekit.models import mlp
from prunekit.prune.state import save_tensors
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

ARCH = "prunekit.models:mlp?sizes=64,32,10&act=tanh"
HERE = Path(__file__).resolve().parent
ARGS = [
    "--criterion",
    "obd",
    "--fisher",
    "ekfac",
    "--fisher-labels",
    "empirical",
    "--sparsity",
    "0.8",
    "--steps",
    "3",
    "--finetune-epochs",
    "0",
    "--final-epochs",
    "0.3",
    "--score-examples",
    "300",
    "--no-ntk",
    "--quiet",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dist") / "dense.safetensors"
    save_tensors(path, mlp("64,32,10").state_dict(), {ARCH_KEY: ARCH, "prunekit.data": "digits"})
    return path


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "-m",
        "prunekit",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def test_two_processes_give_the_masks_of_one(checkpoint, tmp_path):
    assert cli.main(["prune", str(checkpoint), *ARGS, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun(["prune", str(checkpoint), *ARGS, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    one = load_file(tmp_path / "one" / "masks.safetensors")
    two = load_file(tmp_path / "two" / "masks.safetensors")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    for name in w1:  # DDP fine-tuning on half batches: same steps, float-order differences
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4)
    assert not list((tmp_path / "two").glob(".*.tmp"))


def test_a_failing_rank_fails_the_job_and_publishes_nothing(checkpoint, tmp_path):
    out = tmp_path / "failed"
    done = _torchrun(
        ["prune", str(checkpoint), *ARGS, "--data", "dist_data:fail_on_rank1", "--out", str(out)]
    )
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stdout + done.stderr
    assert not out.exists()


def test_only_rank_zero_writes(checkpoint, tmp_path, monkeypatch):
    @contextmanager
    def as_rank_one(_device):
        yield 1

    monkeypatch.setattr(cli_prune, "distributed", as_rank_one)
    out = tmp_path / "rank1"
    assert cli.main(["prune", str(checkpoint), *ARGS, "--out", str(out)]) == 0
    assert not out.exists()


def _worker(rank: int, world: int, init: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        stats = _statistics(shard=(rank, world))
        if rank == 0:
            torch.save(stats, result)
    finally:
        dist.destroy_process_group()


def _statistics(shard=(0, 1)) -> dict:
    torch.manual_seed(0)
    model = mlp("6,5,3").double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    rank, world = shard
    batches = [(x[rank::world], y[rank::world])]
    task, targets = ClassificationTask(), find_targets(model)
    out = {"g": mean_gradient(model, task, targets, batches)}
    for estimator in ("diag", "kfac", "ekfac"):
        curv = fit_curvature(estimator, model, task, targets, batches, labels="empirical")
        out[estimator] = curv.diagonal()
    return out


def test_all_reduced_statistics_equal_one_process(tmp_path):
    result = tmp_path / "stats.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(result)), nprocs=2, join=True)
    two, one = torch.load(result, weights_only=True), _statistics()
    for key in one:
        for name in one[key]:
            torch.testing.assert_close(two[key][name], one[key][name])
