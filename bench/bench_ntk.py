"""Benchmark: prunekit.ntk_alignment vs a naive full-Jacobian computation, same run.

Model: the 784-300-100-10 tanh MLP (float32) on n probe examples (random inputs and labels:
the cost does not depend on the values). Every variant runs in its own subprocess so that
its peak resident memory (ru_maxrss, minus the process's size before the computation) is
its own. Times are the best of ``--repeats`` runs after one warm-up on 2 examples.

    .venv/bin/python bench/bench_ntk.py [--n 100] [--repeats 2]

Prints a markdown table; ratios are relative to the naive row.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev

from prunekit.analysis import ntk_alignment
from prunekit.analysis.ntk import effective_rank, kernel_alignment, label_vector

log = logging.getLogger("bench_ntk")

VARIANTS = {
    "naive": "naive jacrev of all parameters (full J, then J J^T per layer)",
    "ntk256": "prunekit ntk_alignment, budget 256 MB",
    "ntk2048": "prunekit ntk_alignment, budget 2048 MB",
    "ntk256_sparse90": "prunekit ntk_alignment, 90% pruned (masks), budget 256 MB",
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(),
        nn.Linear(100, 10),
    )  # fmt: skip


def naive_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Full Jacobian of the flattened (c, i)-ordered outputs w.r.t. all weights at once."""
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = x.shape[0]

    def flat(weights):
        return functional_call(model, {**params, **weights}, (x,)).T.reshape(-1)

    jac = jacrev(flat)({k: params[k] for k in names})
    full = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], dim=1)
    del jac
    c = full.shape[0] // n
    full = (full.view(c, n, -1) - full.view(c, n, -1).mean(1, keepdim=True)).view(c * n, -1)
    yv = label_vector(y, c)
    per, start, total = {}, 0, None
    for k in names:
        size = params[k].numel()
        part = full[:, start : start + size]
        kernel = (part @ part.T).double()
        per[k] = kernel_alignment(kernel, yv)
        total = kernel if total is None else total + kernel
        start += size
    return {"alignment": kernel_alignment(total, yv), "per_layer": per,
            "effective_rank": effective_rank(total)}  # fmt: skip


def run_variant(variant: str, n: int, repeats: int) -> dict:
    model = make_model().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    masks = None
    if variant.endswith("sparse90"):
        masks = {k: torch.rand(p.shape, generator=g) >= 0.9
                 for k, p in model.named_parameters() if k.endswith("weight")}  # fmt: skip
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in masks:
                    p.mul_(masks[k])

    def once(xs, ys):
        if variant == "naive":
            return naive_alignment(model, xs, ys)
        budget = 2048.0 if variant == "ntk2048" else 256.0
        return ntk_alignment(model, xs, ys, masks=masks, memory_budget_mb=budget)

    # ru_maxrss is a high-water mark: read it before the (small) warm-up, so the peak below
    # is this variant's own working set on top of the process's resting size.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    once(x[:2], y[:2])  # warm-up: torch.func tracing, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = once(x, y)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "n": n, "seconds": min(times), "alignment": result["alignment"],
            "peak_extra_mb": (peak - base) / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=sorted(VARIANTS))
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(run_variant(args.child, args.n, args.repeats)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for variant in VARIANTS:
        log.info("running %s ...", variant)
        cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n),
               "--repeats", str(args.repeats)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    naive = rows[0]
    lines = [
        f"NTK alignment, 784-300-100-10 tanh MLP, n={args.n} probe examples, C=10 "
        f"(K is {10 * args.n}x{10 * args.n}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}",
        "",
        "| method | seconds | x naive time | peak extra RSS (MB) | alignment |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {VARIANTS[r['variant']]} | {r['seconds']:.2f} | "
            f"{r['seconds'] / naive['seconds']:.2f} | {r['peak_extra_mb']:.0f} | "
            f"{r['alignment']:.6f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
