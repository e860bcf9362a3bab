"""Benchmark: prunekit's EKFAC diagonal vs its dense per-example diag and nngeometry 0.4.

Run: ``.venv/bin/python bench/bench_ekfac.py``. nngeometry runs in a separate venv
(/tmp/benchvenv: torch==2.13.0 numpy, then ``--no-deps nngeometry==0.4 einops``), created
on first use with ``--setup``; this script re-invokes itself there as a worker, so nngeometry
never touches the project's environment. Same models, same 1000 examples, same batches of
100, one sampled label per example everywhere (nngeometry: FIM_MonteCarlo, trials=1).

What is timed (best of 3 after one warm-up, ONE CPU thread for every method: on a shared,
loaded 2-core machine OpenMP regions with 2 threads stall and make timings meaningless):
- prunekit ekfac: ``fit_ekfac(...)`` (factor pass, eigh, scaling pass) + ``.diagonal()``;
- prunekit diag: ``fit_diag(..., labels="sampled")`` (exact per-example squared gradients);
- nngeometry ekfac: ``FIM_MonteCarlo(PMatEKFAC)`` (factors + eigh) + ``update_diag`` (the
  scaling refit; required, see design.md §7) + the parameter-space diagonal from
  ``F.data`` with the same (U_G∘U_G) S (U_A∘U_A)^T formula (``get_diag`` raises);
- fwd+bwd: one plain forward + backward of the mean loss over the same batches.
Agreement: relative L2 distance of each diagonal to the exact-label diag Fisher.
Also prints the OBS compensation demo: training loss of the MLP (30 Adam steps) before
pruning, after pruning 10/30/50% of the weights in one step by OBS saliency, and after the
same pruning with ``obs_update``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

VENV = Path("/tmp/benchvenv")
N, BATCH, REPEATS = 1000, 100, 3


def make_mlp() -> nn.Module:
    """The paper's MNIST MLP: 784-300-100-10, tanh."""
    return nn.Sequential(
        nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10)
    )


def make_cnn() -> nn.Module:
    """A small CNN for 1x8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


MODELS = {"mlp": (make_mlp, (784,)), "cnn": (make_cnn, (1, 8, 8))}


def make_data(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model with seeded weights, N standard-normal inputs, labels of a random teacher."""
    build, shape = MODELS[arch]
    torch.manual_seed(seed)
    model, teacher = build(), build()
    x = torch.randn(N, *shape)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return model, x, y


def best_time(fn, repeats: int = REPEATS) -> tuple[float, object]:
    """(best wall time in seconds over ``repeats`` after a warm-up, last result)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def nngeometry_worker(src: str, dst: str) -> None:
    """Runs inside /tmp/benchvenv: time nngeometry's EKFAC diagonal, save it."""
    from nngeometry import FIM_MonteCarlo
    from nngeometry.object import PMatEKFAC
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    blob = torch.load(src)
    model = MODELS[blob["arch"]][0]()
    model.load_state_dict(blob["state"])
    loader = DataLoader(TensorDataset(blob["x"], blob["y"]), batch_size=BATCH)

    def run():
        torch.manual_seed(0)
        fim = FIM_MonteCarlo(model=model, loader=loader, representation=PMatEKFAC, trials=1)
        fim.update_diag(loader)
        evecs, diags = fim.data
        out = {}
        for name, (u_a, u_g) in evecs.items():
            s = diags[name].view(u_g.shape[0], u_a.shape[0])
            block = u_g.pow(2) @ s @ u_a.pow(2).T
            has_bias = dict(model.named_modules())[name].bias is not None
            weight = dict(model.named_parameters())[f"{name}.weight"]
            out[f"{name}.weight"] = block[:, : block.shape[1] - has_bias].reshape(weight.shape)
        return out

    seconds, diag = best_time(run)
    torch.save({"seconds": seconds, "diag": diag}, dst)


def run_nngeometry(arch, model, x, y) -> tuple[float, dict] | None:
    """(seconds, diagonal) from the worker in /tmp/benchvenv, or None if unavailable."""
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"arch": arch, "state": model.state_dict(), "x": x, "y": y}, src)
        cmd = [str(python), __file__, "--worker", str(src), str(dst)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"nngeometry worker failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        out = torch.load(dst)
    return out["seconds"], out["diag"]


def setup_venv() -> None:
    """Create /tmp/benchvenv with torch 2.13.0 and nngeometry 0.4 (no deps)."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", "nngeometry==0.4", "einops"], check=True)


def rel_err(diag: dict, ref: dict) -> float:
    """||diag - ref|| / ||ref|| over all targets."""
    num = sum(float((diag[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].double().pow(2).sum()) for n in ref)
    return (num / den) ** 0.5


def bench_model(arch: str) -> dict:
    """Times and agreement for one model."""
    from prunekit.criteria import fit_diag, fit_ekfac
    from prunekit.prune.targets import find_targets
    from prunekit.types import ClassificationTask

    model, x, y = make_data(arch)
    task, targets = ClassificationTask(), find_targets(model)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]

    def gen():
        return torch.Generator().manual_seed(0)

    def fwd_bwd():
        for xb, yb in batches:
            loss = nn.functional.cross_entropy(model(xb), yb)
            torch.autograd.grad(loss, list(model.parameters()))

    row = {"arch": arch}
    row["fwd_bwd"], _ = best_time(fwd_bwd)
    row["ekfac"], ek = best_time(
        lambda: fit_ekfac(model, task, targets, batches, generator=gen()).diagonal()
    )
    row["diag"], dg = best_time(
        lambda: fit_diag(
            model, task, targets, batches, labels="sampled", generator=gen()
        ).diagonal()
    )
    exact = fit_diag(model, task, targets, batches, labels="exact").diagonal()
    row["err_ekfac"], row["err_diag"] = rel_err(ek, exact), rel_err(dg, exact)
    nng = run_nngeometry(arch, model, x, y)
    if nng is not None:
        row["nngeometry"], nd = nng
        row["err_nngeometry"] = rel_err(nd, exact)
    return row


def obs_demo() -> list[tuple[float, float, float, float]]:
    """(sparsity, dense loss, pruned loss, compensated loss) rows for one-step OBS pruning."""
    from prunekit.criteria import OBS, obs_update
    from prunekit.prune.masks import full_masks, next_masks
    from prunekit.prune.targets import find_targets
    from prunekit.types import ClassificationTask

    model, x, y = make_data("mlp", seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    task, targets = ClassificationTask(), find_targets(model)
    params = dict(model.named_parameters())
    crit = OBS(damping=1e-2, labels="exact")
    result = crit.evaluate(model, task, targets, [(x, y)])

    def loss_with(masks, deltas):
        with torch.no_grad():
            saved = {n: p.clone() for n, p in params.items()}
            for n in targets:
                params[n].mul_(masks[n])
            for n, d in deltas.items():
                params[n].add_(d)
            value = float(nn.functional.cross_entropy(model(x), y))
            for n, p in saved.items():
                params[n].copy_(p)
        return value

    rows = []
    dense = loss_with(full_masks({n: params[n] for n in targets}), {})
    for sparsity in (0.1, 0.3, 0.5):
        masks = next_masks(result.scores, full_masks({n: params[n] for n in targets}), sparsity)
        deltas = obs_update(result.curvature, params, masks, damping=crit.damping)
        rows.append((sparsity, dense, loss_with(masks, {}), loss_with(masks, deltas)))
    return rows


def main() -> None:
    """Print the markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help="create /tmp/benchvenv first")
    args = parser.parse_args()
    if args.worker:
        nngeometry_worker(*args.worker)
        return
    if args.setup and not (VENV / "bin" / "python").exists():
        setup_venv()
    torch.set_num_threads(1)
    rows = [bench_model(arch) for arch in MODELS]
    print(f"EKFAC diagonal, {N} examples, batches of {BATCH}, 1 sampled label, best of {REPEATS}")
    print()
    print(
        "| model | fwd+bwd s | prunekit ekfac s | prunekit diag s | nngeometry ekfac s "
        "| ekfac/nngeometry | ekfac/fwd+bwd | ekfac/diag | rel.err ekfac | rel.err diag "
        "| rel.err nngeometry |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nng = r.get("nngeometry")
        print(
            f"| {r['arch']} | {r['fwd_bwd']:.3f} | {r['ekfac']:.3f} | {r['diag']:.3f} | "
            + (f"{nng:.3f} | {r['ekfac'] / nng:.2f} | " if nng else "n/a | n/a | ")
            + f"{r['ekfac'] / r['fwd_bwd']:.1f} | {r['ekfac'] / r['diag']:.2f} | "
            + f"{r['err_ekfac']:.3f} | {r['err_diag']:.3f} | "
            + (f"{r['err_nngeometry']:.3f} |" if nng else "n/a |")
        )
    print()
    print("| OBS on the MLP, one step | loss dense | loss pruned | loss pruned + obs_update |")
    print("|---|---|---|---|")
    for sparsity, dense, pruned, compensated in obs_demo():
        print(f"| {sparsity:.0%} | {dense:.4f} | {pruned:.4f} | {compensated:.4f} |")


if __name__ == "__main__":
    main()
