"""Costed plan for EKFAC at scale (issue 8): per-layer Kronecker factor sizes of a ResNet-50
and a BERT-base, eigendecomposition time measured at those sizes on this machine, factor
memory, and the time per basis refit when layers are spread over N ranks (largest first).

No model is built and nothing is downloaded: layer shapes come from the architectures'
definitions below. Writes its tables into BENCHMARKS.md.

    python bench/bench_scale_plan.py [--threads 1]
"""

from __future__ import annotations

import argparse
import heapq
import time

import torch
from _report import stdout_to_section  # bench/ is sys.path[0] when run


def resnet50_layers() -> list[tuple[str, int, int]]:
    """(name, A size = in*k*k + 1 bias column, G size = out) of every conv/linear weight."""
    layers = [("conv1 7x7", 3 * 49 + 1, 64)]
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for b in range(blocks):
            name = f"layer{stage + 1}.{b}"
            layers += [
                (f"{name}.conv1 1x1", in_ch + 1, width),
                (f"{name}.conv2 3x3", width * 9 + 1, width),
                (f"{name}.conv3 1x1", width + 1, width * 4),
            ]
            if b == 0:
                layers.append((f"{name}.downsample 1x1", in_ch + 1, width * 4))
            in_ch = width * 4
    layers.append(("fc", 2048 + 1, 1000))
    return layers


def bert_base_layers() -> list[tuple[str, int, int]]:
    """(name, A size, G size) of the encoder's linear weights (embeddings excluded)."""
    layers = []
    for i in range(12):
        for proj in ("query", "key", "value", "attention.output"):
            layers.append((f"layer{i}.{proj}", 768 + 1, 768))
        layers += [(f"layer{i}.intermediate", 768 + 1, 3072), (f"layer{i}.output", 3072 + 1, 768)]
    layers.append(("pooler", 768 + 1, 768))
    return layers


def eigh_seconds(size: int, cache: dict[int, float], repeats: int = 2) -> float:
    """Best-of-``repeats`` time of torch.linalg.eigh on a random SPD float32 matrix."""
    if size not in cache:
        x = torch.randn(size, size)
        spd = x @ x.T / size + torch.eye(size)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.linalg.eigh(spd)
            best = min(best, time.perf_counter() - start)
        cache[size] = best
    return cache[size]


def spread(costs: list[float], ranks: int) -> float:
    """Longest rank time when layers go, largest first, to the least loaded rank."""
    loads = [0.0] * ranks
    heapq.heapify(loads)
    for cost in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + cost)
    return max(loads)


def plan(name: str, layers: list[tuple[str, int, int]], cache: dict[int, float]) -> None:
    """Print the per-size table and the spread-over-ranks summary of one model."""
    costs = [eigh_seconds(a, cache) + eigh_seconds(g, cache) for _, a, g in layers]
    weights = sum((a - 1) * g for _, a, g in layers)
    factor_mb = sum(4 * (a * a + g * g) for _, a, g in layers) / 2**20
    print(
        f"### {name}: {len(layers)} factored layers, {weights / 1e6:.1f} M weights, "
        f"factors A and G {factor_mb:,.0f} MB in float32 (eigenbases the same again)\n"
    )
    print("| factor size | layers using it (as A or G) | eigh s (measured) |")
    print("|---:|---:|---:|")
    uses: dict[int, int] = {}
    for _, a, g in layers:
        uses[a] = uses.get(a, 0) + 1
        uses[g] = uses.get(g, 0) + 1
    for size in sorted(uses):
        print(f"| {size} | {uses[size]} | {cache[size]:.3f} |")
    total = sum(costs)
    print("\n| ranks | basis refit (all eigh), s | x 1 rank |")
    print("|---:|---:|---:|")
    for ranks in (1, 2, 4, 8):
        t = spread(costs, ranks)
        print(f"| {ranks} | {t:.2f} | {t / total:.2f} |")
    largest = max(layers, key=lambda layer: eigh_seconds(layer[1], cache))
    print(
        f"\nLargest single layer: {largest[0]} (A {largest[1]}x{largest[1]}): no spread "
        f"over ranks goes below its {eigh_seconds(largest[1], cache):.2f} s.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for eigh")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache: dict[int, float] = {}
    print(
        f"torch.linalg.eigh, float32, {torch.get_num_threads()} thread(s), best of 2. "
        "Between pruning steps prunekit keeps the basis by default (refit_basis_every=0): "
        "this cost is paid once per run, or every N steps with --refit-basis-every N; "
        "rank spread = layers assigned largest-first to the least loaded rank, then "
        "broadcast (communication not included).\n"
    )
    plan("ResNet-50", resnet50_layers(), cache)
    plan("BERT-base encoder", bert_base_layers(), cache)


if __name__ == "__main__":
    with stdout_to_section("scale_plan", "Costed plan: EKFAC eigendecompositions at scale"):
        main()
