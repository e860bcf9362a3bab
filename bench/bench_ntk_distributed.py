"""One NTK alignment on 1 vs 2 processes (torch.distributed, gloo) on this machine (issue 8).

The 784-300-100-10 tanh MLP (random weights, float32) on a probe of 100 synthetic examples
(C n = 1,000): the exact factored path (Linear layers through the injected capture, the
pipeline's default), the same at 90% sparsity, the same without the eigendecomposition, and
the per-example jacrev path (capture=None). One process with 1 and 2 threads, against two
processes with 1 thread each, every rank building the Gram blocks K_l of its share of the
tensors and one all-reduce summing them. Writes its table into BENCHMARKS.md.

    python bench/bench_ntk_distributed.py
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import stdout_to_section  # bench/ is sys.path[0] when run

from prunekit.analysis.ntk import ntk_alignment
from prunekit.criteria.capture import capture
from prunekit.models import mlp

N, SPARSITY = 100, 0.9
REPEATS = {"jacrev": 2}  # seconds per call; the rest are best of 5
CASES = {
    "factored": {"capture": capture},
    "factored, 90% pruned": {"capture": capture, "pruned": True},
    "factored, spectrum=False": {"capture": capture, "spectrum": False},
    "jacrev": {"capture": None},
}


def _problem(case: str) -> tuple:
    """(model, x, y, ntk_alignment keywords) of ``case``, the same in every process."""
    torch.manual_seed(0)
    model = mlp("784,300,100,10")
    x, y = torch.randn(N, 784), torch.randint(0, 10, (N,))
    kw = dict(CASES[case])
    if kw.pop("pruned", False):
        gen = torch.Generator().manual_seed(1)
        weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
        kw["masks"] = {
            n: torch.rand(p.shape, generator=gen) >= SPARSITY for n, p in weights.items()
        }
    return model, x, y, kw


def _time(case: str, world: int) -> tuple[float, dict]:
    """Best wall seconds of one ntk_alignment call (after a warm-up call) and its result."""
    model, x, y, kw = _problem(case)
    result = ntk_alignment(model, x, y, **kw)  # warm-up: imports, allocator, thread pools
    best = float("inf")
    for _ in range(REPEATS.get(case, 5)):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        result = ntk_alignment(model, x, y, **kw)
        if world > 1:
            dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best, result


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save({case: _time(case, 2) for case in CASES}, out.format(rank=rank))
    finally:
        dist.destroy_process_group()


def _two_processes() -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank{rank}.pt")
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        return [torch.load(out.format(rank=r), weights_only=False) for r in range(2)]


def _split(ranks: list[dict], case: str) -> str:
    """Which tensors each rank built, e.g. "1.weight / 3.weight, 5.weight"."""
    return " / ".join(", ".join(r[case][1]["blocks_computed"]) or "-" for r in ranks)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    load = os.getloadavg()[0]  # other jobs on a shared machine inflate the timings
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for case in CASES:
            single[(case, threads)] = _time(case, 1)
    ranks = _two_processes()
    print(
        f"One ntk_alignment call, n = {N} examples x C = 10 outputs, float32 model (K in "
        "float64), after one warm-up call; best of 5 (jacrev: best of 2). Two processes: gloo "
        "on one machine, 1 thread each, timed between barriers on rank 0. Load average "
        f"(1 min) before / after the run: {load:.1f} / {os.getloadavg()[0]:.1f}.\n"
    )
    print(
        "| path | 1 proc x 1 thread s | 1 proc x 2 threads s | 2 procs x 1 thread s "
        "| 2 procs / 1x1 | 2 procs / 1x2 | rank 0 / rank 1 built | max abs diff vs 1 proc |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for case in CASES:
        (one, ref), (two_threads, _) = single[(case, 1)], single[(case, 2)]
        two, got = ranks[0][case]
        diff = max(abs(got[k] - ref[k]) for k in ("alignment", "trace"))
        print(
            f"| {case} | {one:.3f} | {two_threads:.3f} | {two:.3f} | {two / one:.2f} | "
            f"{two / two_threads:.2f} | {_split(ranks, case)} | {diff:.1e} |"
        )


if __name__ == "__main__":
    with stdout_to_section("ntk_distributed", "NTK alignment, 1 vs 2 processes"):
        main()
