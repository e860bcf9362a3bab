"""Benchmark: time per NTK alignment evaluation vs n: factored Linear path, jacrev path, naive.

Model: the 784-300-100-10 tanh MLP (float32) on n probe examples (random inputs and labels:
the cost does not depend on the values), C = 10 outputs, so K is (10 n) x (10 n). Variants:

- naive: torch.func.jacrev of the (c, i)-ordered outputs w.r.t. all weights at once (the full
  Jacobian), centred, then J_l J_l^T per layer;
- jacrev: prunekit ntk_alignment without ``capture`` (per-example vmap(jacrev), one tensor
  at a time, 256 MB budget);
- factored: ntk_alignment with ``capture=prunekit.criteria.capture.capture`` (how the
  pipeline calls it): Linear kernels from layer inputs and C output-gradient passes;
- the same two at 90% sparsity (random masks, weights zeroed): the masked factored kernel.

Each (variant, n) runs in its own subprocess so that its peak resident memory (ru_maxrss,
minus the process's size before the computation) is its own. Times are the best of
``--repeats`` runs after one warm-up on 2 examples; a variant whose first run takes over 5 s
is timed once. "eig" is the part of the factored time spent in the effective rank (float32
eigvalsh of K), timed separately in the same process.

    .venv/bin/python bench/bench_ntk.py [--n 25 50 100 200] [--repeats 3] [--threads T]

Prints a markdown table; ratio columns are measured in the same run.
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
from _report import stdout_to_section  # bench/ is sys.path[0] when run
from torch import nn
from torch.func import functional_call, jacrev

from prunekit.analysis import ntk_alignment, tangent_kernel
from prunekit.analysis.ntk import effective_rank, kernel_alignment, label_vector
from prunekit.criteria.capture import capture

log = logging.getLogger("bench_ntk")

VARIANTS = ("naive", "jacrev", "factored", "jacrev_sparse90", "factored_sparse90")
SLOW = 5.0  # seconds: time such a variant once instead of best-of-repeats


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
            "effective_rank": effective_rank(total.float())}  # fmt: skip


def _setup(variant: str, n: int):
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
    return model, x, y, masks


def run_variant(variant: str, n: int, repeats: int) -> dict:
    model, x, y, masks = _setup(variant, n)
    hooks = capture if variant.startswith("factored") else None

    def once(xs, ys):
        if variant == "naive":
            return naive_alignment(model, xs, ys)
        return ntk_alignment(model, xs, ys, masks=masks, capture=hooks)

    # ru_maxrss is a high-water mark: read it before the (small) warm-up, so the peak below
    # is this variant's own working set on top of the process's resting size.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    once(x[:2], y[:2])  # warm-up: torch.func tracing, allocator
    times = []
    while len(times) < repeats and not (times and times[0] > SLOW):
        start = time.perf_counter()
        result = once(x, y)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    eig = None
    if hooks is not None:  # the O((C n)^3) floor of every variant: the effective rank
        flat = sum(tangent_kernel(model, x, masks=masks, capture=hooks).values()).float()
        eig = min(_timed(lambda: effective_rank(flat)) for _ in range(repeats))
    return {"variant": variant, "n": n, "seconds": min(times), "runs": len(times),
            "alignment": result["alignment"], "eig_seconds": eig,
            "peak_extra_mb": (peak - base) / 1024}  # fmt: skip


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(rows: dict, sizes: list[int]) -> list[str]:
    lines = [
        "| n | K size | naive (s) | jacrev (s) | factored (s) | of which eig (s) | "
        "jacrev / factored | naive / factored | jacrev 90% (s) | factored 90% (s) | "
        "jacrev / factored 90% | max abs. diff. alignment | peak extra MB naive / jacrev "
        "/ factored |",
        "|" + "---:|" * 13,
    ]
    for n in sizes:
        r = {v: rows[(v, n)] for v in VARIANTS}
        s = {v: r[v]["seconds"] for v in VARIANTS}
        diff = max(
            abs(r[f"factored{tag}"]["alignment"] - r[f"jacrev{tag}"]["alignment"])
            for tag in ("", "_sparse90")
        )
        peaks = " / ".join(f"{r[v]['peak_extra_mb']:.0f}" for v in VARIANTS[:3])
        lines.append(
            f"| {n} | {10 * n} | {s['naive']:.2f} | {s['jacrev']:.2f} | {s['factored']:.3f} | "
            f"{r['factored']['eig_seconds']:.3f} | {s['jacrev'] / s['factored']:.0f} | "
            f"{s['naive'] / s['factored']:.0f} | {s['jacrev_sparse90']:.2f} | "
            f"{s['factored_sparse90']:.3f} | "
            f"{s['jacrev_sparse90'] / s['factored_sparse90']:.0f} | {diff:.1e} | {peaks} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        sys.stdout.write(json.dumps(run_variant(args.child, args.n[0], args.repeats)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = {}
    for n in args.n:
        for variant in VARIANTS:
            log.info("running %s, n=%d ...", variant, n)
            cmd = [sys.executable, __file__, "--child", variant, "--n", str(n),
                   "--repeats", str(args.repeats)]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[(variant, n)] = json.loads(out.strip().splitlines()[-1])
    lines = [
        "NTK alignment per evaluation, 784-300-100-10 tanh MLP (float32), C=10, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats} "
        f"(once when over {SLOW:.0f} s)",
        "",
        *_table(rows, args.n),
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    with stdout_to_section("ntk", "NTK alignment: time per evaluation vs n"):
        main()
