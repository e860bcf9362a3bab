"""Benchmark: prunekit's EKFAC diagonal vs nngeometry 0.4 and BackPACK 1.7.1, per method.

Run: ``.venv/bin/python bench/bench_ekfac.py --setup``. The peers run in a separate venv
(/tmp/benchvenv, created by ``--setup``: ``--no-deps nngeometry==0.4 einops`` and ``--no-deps
backpack-for-pytorch==1.7.1 unfoldNd packaging``, on top of the project environment's own
torch==2.13.0 and numpy, which a .pth file makes visible: no second torch download); this
script re-invokes itself there, so no peer touches the project's environment. Same models (the
MNIST MLP 784-300-100-10 and a CNN on 1x8x8 digits-shaped inputs), same 1000 examples,
same batches of 100, one sampled label per example (nngeometry: FIM_MonteCarlo, trials=1).

Every method runs in a FRESH subprocess (ONE CPU thread: on a shared, loaded 2-core box
2-thread OpenMP regions stall); time = best of 3 after one warm-up (1 run, no warm-up,
for the masked refit); peak memory = ru_maxrss after the runs minus ru_maxrss before
the first (setup and imports excluded).
- fwd+bwd: one plain forward + backward of the mean loss over the same batches;
- ekfac: ``fit_ekfac(...)`` (one pass: factors + kept rows, eigh, S) + ``.diagonal()``;
- ekfac 2-pass: the same with ``cache_bytes=0`` (the old route: a second streamed pass);
- ekfac refit: ``refit_scaling(basis, ...)`` + ``.diagonal()`` with the basis kept (what
  every pruning step after the first costs); "masked": with 50% of each weight pruned;
- diag: ``fit_diag(..., labels="sampled")`` (exact per-example squared gradients);
- nngeometry ekfac: ``FIM_MonteCarlo(PMatEKFAC)`` + ``update_diag`` + the parameter-space
  diagonal from ``F.data`` by (U_G∘U_G) S (U_A∘U_A)^T (``get_diag`` raises);
- backpack diag-ggn: ``DiagGGNExact`` (the exact diagonal Fisher of a softmax classifier).
Agreement: ||d - d_exact|| / ||d_exact|| against prunekit's ``fit_diag(labels="exact")``.
Also prints the OBS compensation demo (loss after one-step OBS pruning of the MLP, with
and without ``obs_update``).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import stdout_to_section  # bench/ is sys.path[0] when run
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


def best_time(fn, repeats: int = REPEATS, warmup: bool = True) -> tuple[float, object]:
    """(best wall time in seconds over ``repeats`` after an optional warm-up, last result)."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


PEERS = ("nngeometry", "backpack")
METHODS = ("fwd_bwd", "ekfac", "ekfac_2pass", "refit", "refit_masked", "diag", *PEERS)


def _batches(x, y):
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def _masks(targets) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {t: torch.rand(tg.shape, generator=gen) > 0.5 for t, tg in targets.items()}


def prunekit_method(method: str, model, x, y):
    """The function timed for a prunekit method (returns a diagonal or None)."""
    from prunekit.criteria import fit_diag, fit_ekfac, refit_scaling
    from prunekit.prune.targets import find_targets
    from prunekit.types import ClassificationTask

    task, targets, batches = ClassificationTask(), find_targets(model), _batches(x, y)

    def gen():
        return torch.Generator().manual_seed(0)

    if method == "fwd_bwd":

        def run():
            for xb, yb in batches:
                loss = nn.functional.cross_entropy(model(xb), yb)
                torch.autograd.grad(loss, list(model.parameters()))

        return run
    if method in ("ekfac", "ekfac_2pass"):
        budget = {"ekfac_2pass": {"cache_bytes": 0}}.get(method, {})
        return lambda: fit_ekfac(
            model, task, targets, batches, generator=gen(), **budget
        ).diagonal()
    if method in ("refit", "refit_masked"):
        basis = fit_ekfac(model, task, targets, batches, generator=gen()).basis
        masks = _masks(targets) if method == "refit_masked" else None
        return lambda: refit_scaling(
            basis, model, task, targets, batches, generator=gen(), masks=masks
        ).diagonal()
    return lambda: fit_diag(
        model, task, targets, batches, labels="sampled", generator=gen()
    ).diagonal()


def nngeometry_method(model, x, y):
    """nngeometry 0.4: FIM_MonteCarlo(PMatEKFAC) + update_diag + diagonal from F.data."""
    from nngeometry import FIM_MonteCarlo
    from nngeometry.object import PMatEKFAC
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())

    def run():
        torch.manual_seed(0)
        fim = FIM_MonteCarlo(model=model, loader=loader, representation=PMatEKFAC, trials=1)
        fim.update_diag(loader)
        evecs, diags = fim.data
        out = {}
        for name, (u_a, u_g) in evecs.items():
            s = diags[name].view(u_g.shape[0], u_a.shape[0])
            block = u_g.pow(2) @ s @ u_a.pow(2).T
            weight = params[f"{name}.weight"]
            cols = block.shape[1] - (modules[name].bias is not None)
            out[f"{name}.weight"] = block[:, :cols].reshape(weight.shape)
        return out

    return run


def backpack_method(model, x, y):
    """BackPACK 1.7.1 DiagGGNExact over the batches (sum-reduced loss, divided by N)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    batches = _batches(x, y)

    def run():
        acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for xb, yb in batches:
            model.zero_grad()
            with backpack(DiagGGNExact()):
                lossfunc(model(xb), yb).backward()
            for n, p in model.named_parameters():
                acc[n] += p.diag_ggn_exact
        return {n: a / len(x) for n, a in acc.items() if n.endswith("weight")}

    return run


def worker(method: str, src: str, dst: str) -> None:
    """Fresh process: time one method on the saved model/data, save seconds, MB, diag."""
    torch.set_num_threads(1)
    blob = torch.load(src)
    model = MODELS[blob["arch"]][0]()
    model.load_state_dict(blob["state"])
    x, y = blob["x"], blob["y"]
    if method == "nngeometry":
        fn = nngeometry_method(model, x, y)
    elif method == "backpack":
        fn = backpack_method(model, x, y)
    else:
        fn = prunekit_method(method, model, x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    repeats = 1 if method == "refit_masked" else REPEATS
    seconds, diag = best_time(fn, repeats, warmup=repeats > 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    torch.save({"seconds": seconds, "mb": peak / 1024, "diag": diag}, dst)


def run_method(method: str, src: Path) -> dict | None:
    """Run ``worker`` in a fresh subprocess (peers in /tmp/benchvenv); None if unavailable."""
    python = VENV / "bin" / "python" if method in PEERS else Path(sys.executable)
    if not python.exists():
        return None
    dst = src.with_name(f"{method}.pt")
    cmd = [str(python), __file__, "--worker", method, str(src), str(dst)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{method} worker failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return torch.load(dst)


def setup_venv() -> None:
    """Create /tmp/benchvenv: nngeometry 0.4 and BackPACK 1.7.1 (no deps) over this
    environment's packages (torch 2.13.0, numpy), linked by a .pth file."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    import site

    ours = [p for p in site.getsitepackages() if Path(p, "torch").is_dir()]
    theirs = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(theirs, "_project_packages.pth").write_text("\n".join(ours) + "\n")
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "--no-deps", "nngeometry==0.4", "einops"], check=True)
    peer = ["backpack-for-pytorch==1.7.1", "unfoldNd", "packaging"]  # unfoldNd needs packaging
    subprocess.run([*pip, "--no-deps", *peer], check=True)


def rel_err(diag: dict, ref: dict) -> float:
    """||diag - ref|| / ||ref|| over all targets."""
    num = sum(float((diag[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].double().pow(2).sum()) for n in ref)
    return (num / den) ** 0.5


def bench_model(arch: str) -> dict:
    """{method: result dict with 'seconds', 'mb', 'err'} for one model."""
    from prunekit.criteria import fit_diag
    from prunekit.prune.targets import find_targets
    from prunekit.types import ClassificationTask

    model, x, y = make_data(arch)
    exact = fit_diag(
        model, ClassificationTask(), find_targets(model), _batches(x, y), labels="exact"
    ).diagonal()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.pt"
        torch.save({"arch": arch, "state": model.state_dict(), "x": x, "y": y}, src)
        for method in METHODS:
            out = run_method(method, src)
            if out is not None:
                # A masked S is another quantity (pruned weights excluded): no agreement.
                compare = out["diag"] and method != "refit_masked"
                out["err"] = rel_err(out["diag"], exact) if compare else None
                results[method] = out
    return results


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


LABELS = {
    "fwd_bwd": "plain fwd+bwd",
    "ekfac": "prunekit ekfac (1 pass)",
    "ekfac_2pass": "prunekit ekfac, 2-pass route",
    "refit": "prunekit ekfac refit, basis kept",
    "refit_masked": "prunekit ekfac refit, basis kept, 50% masked",
    "diag": "prunekit diag (sampled)",
    "nngeometry": "nngeometry 0.4 ekfac",
    "backpack": "BackPACK 1.7.1 DiagGGNExact",
}


def print_table(arch: str, res: dict) -> None:
    """One markdown table per model: seconds, ratios, peak MB, agreement."""
    base, nng = res["fwd_bwd"]["seconds"], res.get("nngeometry", {}).get("seconds")
    print(f"\n{arch}: {N} examples, batches of {BATCH}, 1 sampled label, {REPEATS} repeats\n")
    print("| method | s | x fwd+bwd | x nngeometry ekfac | peak MB | rel.err vs exact diag |")
    print("|---|---|---|---|---|---|")
    for method, r in res.items():
        ratio = f"{r['seconds'] / nng:.2f}" if nng else "n/a"
        err = f"{r['err']:.3f}" if r["err"] is not None else "-"
        print(
            f"| {LABELS[method]} | {r['seconds']:.3f} | {r['seconds'] / base:.1f} | {ratio} "
            f"| {r['mb']:.0f} | {err} |"
        )


def main() -> None:
    """Print the markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "IN", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--setup", action="store_true", help="create /tmp/benchvenv first")
    parser.add_argument("--no-obs", action="store_true", help="skip the OBS demo")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.setup:
        setup_venv()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread per process")
    for arch in MODELS:
        print_table(arch, bench_model(arch))
    if args.no_obs:
        return
    print()
    print("| OBS on the MLP, one step | loss dense | loss pruned | loss pruned + obs_update |")
    print("|---|---|---|---|")
    for sparsity, dense, pruned, compensated in obs_demo():
        print(f"| {sparsity:.0%} | {dense:.4f} | {pruned:.4f} | {compensated:.4f} |")


if __name__ == "__main__":
    with stdout_to_section(
        "ekfac", "EKFAC diagonal vs nngeometry and BackPACK: time, memory, agreement"
    ):
        main()
