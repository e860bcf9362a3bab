"""Curvature phase on 1 vs 2 processes (torch.distributed, gloo) on this machine (issue 8).

The 784-300-100-10 tanh MLP and the digits CNN; 1,000 examples; EKFAC (one sampled label)
and the exact diagonal Fisher. One process with 1 and with 2 threads, against two processes
with 1 thread each, every rank scoring half of the examples and all-reducing the statistics.
Writes its table into BENCHMARKS.md.

    python bench/bench_distributed.py
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import stdout_to_section  # bench/ is sys.path[0] when run

from prunekit.criteria import fit_curvature
from prunekit.models import cnn, mlp
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

N, REPEATS = 1000, 3
CASES = {
    "mlp 784-300-100-10": (lambda: mlp("784,300,100,10"), (784,)),
    "cnn digits": (lambda: cnn(1, 8, "16,32", 64, 10), (1, 8, 8)),
}
ESTIMATORS = (("ekfac", "sampled"), ("diag", "exact"))


def _fit_seconds(case: str, estimator: str, labels: str, shard=(0, 1)) -> float:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model, x = factory(), torch.randn(N, *shape)
    y = torch.randint(0, 10, (N,))
    rank, world = shard
    xs, ys = x[rank::world], y[rank::world]
    batches = [(xs[i : i + 100], ys[i : i + 100]) for i in range(0, len(xs), 100)]
    targets, task = find_targets(model), ClassificationTask()
    best = float("inf")
    for _ in range(REPEATS):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(rank)
        fit_curvature(estimator, model, task, targets, batches, labels=labels, generator=gen)
        if world > 1:
            dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        times = {(c, e): _fit_seconds(c, e, lab, (rank, 2)) for c in CASES for e, lab in ESTIMATORS}
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def _two_processes() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        return torch.load(out, weights_only=False)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for case in CASES:
            for estimator, labels in ESTIMATORS:
                single[(case, estimator, threads)] = _fit_seconds(case, estimator, labels)
    double = _two_processes()
    print(
        f"{N} examples, batches of 100, best of {REPEATS}; two processes: gloo on one "
        "machine, 1 thread each, statistics all-reduced (the masks match one process); "
        "EKFAC's eigendecompositions spread over the ranks by factor (each factor on one "
        "rank, then broadcast), so the largest factor (the MLP's 785x785 A) bounds the "
        "gain. Runs of well under a second: the ratios move by ~0.3 between runs on this "
        "shared machine.\n"
    )
    print(
        "| model | estimator | 1 proc x 1 thread s | 1 proc x 2 threads s | 2 procs x 1 thread s "
        "| 2 procs / 1x1 | 2 procs / 1x2 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        for estimator, labels in ESTIMATORS:
            one, two_threads = single[(case, estimator, 1)], single[(case, estimator, 2)]
            two = double[(case, estimator)]
            print(
                f"| {case} | {estimator} ({labels}) | {one:.3f} | {two_threads:.3f} | "
                f"{two:.3f} | {two / one:.2f} | {two / two_threads:.2f} |"
            )


if __name__ == "__main__":
    with stdout_to_section("distributed", "Curvature phase on 1 vs 2 processes"):
        main()
