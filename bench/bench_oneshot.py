"""One-shot pruning WITHOUT fine-tuning (issue 16): MLP 784-40-20-10, ReLU, no biases.

The MLP is trained here on mnist5k (4,000 train / 1,000 validation), then pruned to 90, 95
and 98% with no fine-tuning at all, side by side: global magnitude; a plain
reimplementation of WoodFisher-block written in this script (``woodfisher``: empirical
Fisher from per-example gradients, block-diagonal with blocks of ``BLOCK`` consecutive
weights, dampened direct inverse, OBS saliency w^2 / (2 [F^-1]_qq), summed single-weight
updates within each block, pruned in several shots with the Fisher re-estimated between
them, the damping chosen per sparsity on held-out TRAINING examples); and every prunekit
mode through ``prunekit.loop.run_pruning`` with finetune_epochs=0 and final_epochs=0 (1
and 10 steps): wanda, the default (obd on EKFAC with ``update='auto'``, which is the
row-form update in a run without fine-tuning), obd without an update, obd on the exact
diagonal, obs with the summed, the joint and the row-form update, multi-shot steps,
sparsegpt, as far as this checkout has them (their validation split, where they choose
the update's damping, is WoodFisher's held-out training examples). Accuracy on the
validation split, which no mode chose on. Prints the issue's GOAL lines.

    .venv/bin/python bench/bench_oneshot.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from dataclasses import fields

import torch
import torch.nn.functional as F  # noqa: N812
from _report import markdown_table, update_section  # bench/ is sys.path[0] when run
from torch import nn

from prunekit.criteria import CRITERIA
from prunekit.data import load_data
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.loop import run_pruning
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask

SPARSITIES = (0.9, 0.95, 0.98)
FISHER_N = 1000  # examples per Fisher estimate (= prunekit's score_examples default)
BLOCK = 100  # WoodFisher block size (consecutive weights of one layer)
SHOTS = 16  # WoodFisher re-estimations of the Fisher per one-shot prune
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)  # x mean diagonal of the block Fisher
HELDOUT = 1000  # the last training examples: WoodFisher's damping choice
FIELDS = {f.name for f in fields(PruneSettings)}


def build_mlp() -> nn.Sequential:
    """784-40-20-10, ReLU, no biases (the WoodFisher paper's MLPNet)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 40, bias=False),
        nn.ReLU(),
        nn.Linear(40, 20, bias=False),
        nn.ReLU(),
        nn.Linear(20, 10, bias=False),
    )


def train_dense(data, epochs: float) -> nn.Sequential:
    """SGD (lr 0.1, momentum 0.9, wd 5e-4, cosine), batch 100, seed 0."""
    torch.manual_seed(0)
    model = build_mlp()
    gen = torch.Generator().manual_seed(0)
    phase = FinetuneSettings(epochs=epochs, lr=0.1, lr_schedule="cosine")
    finetune(model, ClassificationTask(), data.train_batches(100, gen), phase)
    return model.eval()


# ------------------------------------------------------------- WoodFisher-block (own code)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """name -> (N, out, in) gradients of each example's cross-entropy (empirical Fisher).

    For a bias-free Linear layer the gradient of example n is the outer product of the
    gradient at the layer's output and its input: both are captured by hooks in one
    forward/backward of the summed loss (the sum keeps the per-example gradients apart).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs, outs, hooks = {}, {}, []
    for n, m in layers.items():
        assert m.bias is None, "the bench's Fisher handles bias-free Linear layers only"
        hooks.append(m.register_forward_hook(lambda _m, a, o, n=n: inputs.__setitem__(n, a[0])))
        hooks.append(
            m.register_full_backward_hook(lambda _m, gi, go, n=n: outs.__setitem__(n, go[0]))
        )
    try:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the hooks fire for outputs only, as wanted
            warnings.simplefilter("ignore", UserWarning)
            F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {
        f"{n}.weight": torch.einsum("no,ni->noi", outs[n].detach(), inputs[n].detach())
        for n in layers
    }


def blocks_of(n: int) -> list[slice]:
    """Consecutive blocks of BLOCK entries covering range(n) (the last may be shorter)."""
    return [slice(i, min(i + BLOCK, n)) for i in range(0, n, BLOCK)]


def block_inverses(g: torch.Tensor, keep: torch.Tensor, damping: float) -> list[torch.Tensor]:
    """[F_b + lam I]^-1 per block of one layer (``blocks_of`` order), float64.

    g: (N, P) per-example gradients of the layer, flattened; keep: (P,) bool. Columns of
    pruned weights are zeroed, so F^-1 restricted to the survivors is (F_SS + lam I)^-1
    exactly and a pruned weight never moves. lam = damping x mean diagonal of the layer's
    Fisher over its surviving weights. Full blocks are inverted as one batch.
    """
    g = g.double() * keep.double()
    n, p = g.shape
    diag = (g * g).sum(0) / n
    lam = damping * float(diag[keep].mean().clamp_min(1e-12))
    full = p // BLOCK
    out: list[torch.Tensor] = []
    if full:
        gb = g[:, : full * BLOCK].reshape(n, full, BLOCK)
        fb = torch.einsum("nbi,nbj->bij", gb, gb) / n
        fb.diagonal(dim1=-2, dim2=-1).add_(lam)
        out += list(torch.linalg.inv(fb).unbind(0))
    if p % BLOCK:
        gb = g[:, full * BLOCK :]
        fb = gb.T @ gb / n
        fb.diagonal().add_(lam)
        out.append(torch.linalg.inv(fb))
    return out


def woodfisher_shot(model, x, y, masks: dict, target: float, damping: float) -> dict:
    """One shot: refit the block Fisher, prune the lowest saliencies globally up to
    ``target`` sparsity, add the summed OBS updates, zero the pruned. Returns new masks."""
    params = dict(model.named_parameters())
    grads = per_example_grads(model, x, y)
    inv, sal = {}, {}
    for name, p in params.items():
        keep = masks[name].flatten()
        inv[name] = block_inverses(grads[name].flatten(1), keep, damping)
        dinv = torch.cat([m.diagonal() for m in inv[name]])
        s = p.detach().double().flatten() ** 2 / (2 * dinv)
        sal[name] = torch.where(keep, s, torch.full_like(s, -1.0))  # pruned: first to go
    flat = torch.cat(list(sal.values()))
    n_prune = int(round(target * flat.numel()))
    order = torch.argsort(flat, stable=True)
    prune_flat = torch.zeros_like(flat, dtype=torch.bool)
    prune_flat[order[:n_prune]] = True
    new_masks, start = {}, 0
    with torch.no_grad():
        for name, p in params.items():
            k = p.numel()
            gone = prune_flat[start : start + k]
            start += k
            w = p.detach().double().flatten()
            removed = gone & masks[name].flatten()  # newly removed this shot
            delta = torch.zeros_like(w)
            for b, m in zip(blocks_of(k), inv[name], strict=True):
                v = torch.where(removed[b], w[b] / m.diagonal(), torch.zeros_like(w[b]))
                delta[b] = -(m @ v)
            w = (w + delta) * (~gone).double()
            p.copy_(w.view_as(p).to(p.dtype))
            new_masks[name] = ~gone.view_as(p)
    return new_masks


def woodfisher(dense, x, y, sparsity: float, shots: int, damping: float) -> nn.Module:
    """WoodFisher-block one-shot prune of a copy of ``dense`` in ``shots`` shots (the
    target sparsity of shot k: 1 - (1 - s)^(k/shots), prunekit's 'exp' schedule)."""
    model = copy.deepcopy(dense)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for k in range(1, shots + 1):
        target = 1 - (1 - sparsity) ** (k / shots)
        masks = woodfisher_shot(model, x, y, masks, target, damping)
    return model


def check_woodfisher() -> float:
    """Float64 oracle on a tiny layer: one shot removing one weight per block must equal the
    dense OBS update -w_q H^-1 e_q / [H^-1]_qq. Returns the max abs difference."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3, bias=False)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    w0 = model[0].weight.detach().clone().flatten()
    g = per_example_grads(model, x, y)["0.weight"].flatten(1)
    h = g.T @ g / 40
    lam = 1e-2 * float(h.diagonal().mean())
    hinv = torch.linalg.inv(h + lam * torch.eye(18, dtype=torch.float64))
    q = int(torch.argmin(w0**2 / hinv.diagonal()))
    masks = {"0.weight": torch.ones(3, 6, dtype=torch.bool)}
    woodfisher_shot(model, x, y, masks, 1 / 18, 1e-2)  # BLOCK >= 18: one block
    expect = w0 - w0[q] * hinv[:, q] / hinv[q, q]
    expect[q] = 0.0
    return float((model[0].weight.detach().flatten() - expect).abs().max())


# ------------------------------------------------------------------------- the modes


def summed() -> dict:
    """The summed single-weight OBS update (`update='summed'`, or the older compensate)."""
    return {"update": "summed"} if "update" in FIELDS else {"compensate": True}


PRUNEKIT = [  # (label, PruneSettings overrides, step counts)
    ("prunekit magnitude", {"criterion": "magnitude"}, (1,)),
    ("prunekit wanda", {"criterion": "wanda"}, (1, 10)),
    ("prunekit default: obd, EKFAC, update auto (= rows here), shots auto", {}, (1, 10)),
    ("prunekit default with --shots 1", {"shots": 1}, (1,)),
    ("prunekit obd, EKFAC, no update", {"criterion": "obd", "update": "none"}, (1, 10)),
    (
        "prunekit obd, exact diag",
        {"criterion": "obd", "fisher": "diag", "labels": "exact"},
        (1, 10),
    ),
    ("prunekit obs + summed update", {"criterion": "obs", **summed()}, (1, 10)),
    ("prunekit obd + joint update", {"criterion": "obd", "update": "joint"}, (1, 10)),
    ("prunekit obs + joint update", {"criterion": "obs", "update": "joint"}, (1, 10)),
    ("prunekit obs + rows update", {"criterion": "obs", "update": "rows"}, (1, 10)),
    ("prunekit obd, shots 4", {"criterion": "obd", "shots": 4, "update": "none"}, (1, 10)),
    ("prunekit obs + joint, shots 4", {"criterion": "obs", "update": "joint", "shots": 4}, (1, 10)),
    ("prunekit obs + joint, shots 16", {"criterion": "obs", "update": "joint", "shots": 16}, (1,)),
    ("prunekit sparsegpt", {"criterion": "sparsegpt"}, (1, 10)),
]
DEFAULT_OBD = "prunekit default: obd, EKFAC, update auto (= rows here), shots auto"


def missing(settings: dict) -> list[str]:
    out = [k for k in settings if k not in FIELDS]
    if settings.get("criterion", "obd") not in CRITERIA:
        out.append(f"criterion {settings['criterion']!r}")
    return out


def prunekit_run(dense, data, settings: dict, sparsity: float, steps: int) -> dict:
    """run_pruning on a copy with no fine-tuning at all; validation metrics after it.

    The run's own validation split (where it chooses the update's damping) is the held-out
    TRAINING examples WoodFisher chooses on, so no mode chooses on the examples it is
    scored on."""
    model = copy.deepcopy(dense)
    held = dataclasses.replace(
        data, x_val=data.x_train[-HELDOUT:], y_val=data.y_train[-HELDOUT:]
    )
    cfg = PruneSettings(
        sparsity=sparsity, steps=steps, finetune_epochs=0.0, final_epochs=0.0, lr=0.01,
        seed=0, ntk=False, **settings,
    )  # fmt: skip
    t0 = time.perf_counter()
    run_pruning(model, held, cfg)
    seconds = time.perf_counter() - t0
    return {**evaluate(model, ClassificationTask(), data.val_batches()), "seconds": seconds}


def magnitude_run(dense, data, sparsity: float) -> dict:
    """Global magnitude (|w| over all three layers), no update."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    flat = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
    k = int(round(sparsity * flat.numel()))
    threshold = torch.sort(flat).values[k - 1]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((p.abs() > threshold).to(p.dtype))
    m = evaluate(model, ClassificationTask(), data.val_batches())
    return {**m, "seconds": time.perf_counter() - t0}


def woodfisher_run(dense, data, sparsity: float, shots: int, fisher_n: int) -> dict:
    """WoodFisher-block with the damping that scores best on held-out training examples."""
    task = ClassificationTask()
    x, y = data.x_train[:fisher_n], data.y_train[:fisher_n]
    held = [(data.x_train[-HELDOUT:], data.y_train[-HELDOUT:])]
    t0 = time.perf_counter()
    tried = []
    for damping in DAMPINGS:
        model = woodfisher(dense, x, y, sparsity, shots, damping)
        h = evaluate(model, task, held)
        tried.append((h["accuracy"], -h["loss"], damping, model))
    acc, _, damping, model = max(tried, key=lambda t: t[:2])
    m = evaluate(model, task, data.val_batches())
    seconds = (time.perf_counter() - t0) / len(DAMPINGS)  # one damping's run
    return {**m, "seconds": seconds, "damping": damping, "heldout": acc}


def safe(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # a mode under construction: report it, keep going
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def run_all(dense, data, sparsities, quick: bool) -> tuple[list, dict]:
    """(row keys (label, steps) in order, {(label, steps, sparsity): result})."""
    keys, res = [("global magnitude (own)", 1)], {}
    wf = [(f"WoodFisher-block (own), {SHOTS} shots", SHOTS), ("WoodFisher-block (own), 1 shot", 1)]
    keys += [(label, shots) for label, shots in wf]
    todo = [(lb, st, s) for lb, s_, steps in PRUNEKIT if not missing(s_) for st in steps
            for s in [s_]]  # fmt: skip
    keys += [(lb, st) for lb, st, _ in todo]
    fisher_n = 200 if quick else FISHER_N
    for sp in sparsities:
        res[(keys[0][0], 1, sp)] = magnitude_run(dense, data, sp)
        for label, shots in wf:
            res[(label, shots, sp)] = safe(
                lambda sp=sp, n=shots: woodfisher_run(dense, data, sp, n, fisher_n)
            )
        for label, steps, settings in todo:
            res[(label, steps, sp)] = safe(
                lambda s=settings, st=steps, sp=sp: prunekit_run(dense, data, s, sp, st)
            )
        for k in keys:
            r = res[(*k, sp)]
            text = r.get("error") or f"{100 * r['accuracy']:.2f}% {r['seconds']:.1f} s"
            print(f"  [{sp:.2f}] {k[0]} ({k[1]}): {text}", file=sys.stderr, flush=True)
    return keys, res


def acc(r: dict) -> str:
    return "failed" if "error" in r else f"{100 * r['accuracy']:.2f}"


def report(dense_m, keys, res, sparsities, epochs, check: float) -> str:
    rows, failed = [], []
    for label, steps in keys:
        rs = [res[(label, steps, sp)] for sp in sparsities]
        ok = [r for r in rs if "error" not in r]
        secs = sum(r["seconds"] for r in ok) / max(1, len(ok))
        rows.append([label, steps, *(acc(r) for r in rs), f"{secs:.1f}"])
        failed += [f"- {label}, {steps} step(s), {sp:.0%}: `{r['error']}`"
                   for sp, r in zip(sparsities, rs, strict=True) if "error" in r]  # fmt: skip
    damp = ", ".join(
        f"{sp:.0%}: {res[(k[0], k[1], sp)].get('damping', 'n/a')}"
        for k in keys[1:2] for sp in sparsities
    )  # fmt: skip
    headers = ["method", "steps / shots", *(f"acc {sp:.0%}" for sp in sparsities), "s per run"]
    lines = [
        f"Dense MLP 784-40-20-10, ReLU, no biases, trained here ({epochs:g} epochs SGD lr 0.1, "
        f"momentum 0.9, wd 5e-4, cosine, batch 100, seed 0) on mnist5k (4,000 train / 1,000 "
        f"validation): validation accuracy {100 * dense_m['accuracy']:.2f}%, loss "
        f"{dense_m['loss']:.4f}. No fine-tuning anywhere; accuracy (%) on the validation "
        "split right after pruning. prunekit rows: `run_pruning(model, load_data('mnist5k'), "
        "PruneSettings(finetune_epochs=0, final_epochs=0, steps=..., seed=0, ...))`, scores "
        f"from the first 1,000 training examples. WoodFisher-block (this script): empirical "
        f"Fisher of the first {FISHER_N} training examples (per-example gradients), blocks of "
        f"{BLOCK} consecutive weights, direct inverse of F_b + lam I with lam = d x mean "
        f"diag(F) of the layer, d chosen per sparsity from {list(DAMPINGS)} by accuracy on the "
        f"last {HELDOUT} training examples (chosen: {damp}), global saliency w^2/(2[F^-1]_qq), "
        "summed single-weight updates per block, target sparsity of shot k 1-(1-s)^(k/K). "
        f"Oracle check (dense OBS update on a tiny layer): max difference {check:.1e}.\n",
        markdown_table(headers, rows),
        "",
    ]
    lines += goals(keys, res, sparsities)
    lines.append("\nModes that failed:\n\n" + ("\n".join(failed) if failed else "- none"))
    gone = [f"- {lb}: needs {', '.join(missing(s))}" for lb, s, _ in PRUNEKIT if missing(s)]
    lines.append("\nModes not in this checkout:\n\n" + ("\n".join(gone) if gone else "- none"))
    return "\n".join(lines)


def goals(keys, res, sparsities) -> list[str]:
    out = []
    ok = lambda k, sp: "error" not in res[(*k, sp)]  # noqa: E731
    mag = {sp: res[(*keys[0], sp)]["accuracy"] for sp in sparsities}
    if 0.95 in sparsities:
        pk = [k for k in keys if k[0].startswith("prunekit") and ok(k, 0.95)]
        best = max(pk, key=lambda k: res[(*k, 0.95)]["accuracy"])
        b = res[(*best, 0.95)]["accuracy"]
        wfk = [k for k in keys[1:3] if ok(k, 0.95)]
        wf = max(res[(*k, 0.95)]["accuracy"] for k in wfk)
        out.append(f"Best prunekit mode at 95%: **{best[0]}, {best[1]} step(s)** "
                   f"({100 * b:.2f}%).\n")  # fmt: skip
        checks = (
            (f"95% best prunekit >= WoodFisher reimplementation ({100 * wf:.2f})", wf),
            (f"95% best prunekit >= magnitude + 10 (magnitude {100 * mag[0.95]:.2f})",
             mag[0.95] + 0.10),
        )  # fmt: skip
        for text, bound in checks:
            state = "MET" if b >= bound else "MISSED"
            out.append(f"- GOAL {state}: {text}: {100 * b:.2f} ({100 * (b - bound):+.2f} points)")
    worst = []
    for k in keys:
        if k[0] != DEFAULT_OBD:
            continue
        for sp in sparsities:
            if ok(k, sp):
                worst.append((res[(*k, sp)]["accuracy"] - mag[sp], k[1], sp))
    if worst:
        d, st, sp = min(worst)
        state = "MET" if d >= 0 else "MISSED"
        out.append(f"- GOAL {state}: the default never below magnitude: worst case {st} step(s) "
                   f"at {sp:.0%}: {100 * d:+.2f} points vs magnitude")  # fmt: skip
    for sp in sparsities:
        pk = [k for k in keys if k[0].startswith("prunekit") and ok(k, sp)]
        if pk:
            best = max(pk, key=lambda k: res[(*k, sp)]["accuracy"])
            out.append(f"- best prunekit mode at {sp:.0%}: {best[0]}, {best[1]} step(s): "
                       f"{100 * res[(*best, sp)]['accuracy']:.2f}%")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90%% only, short training, no write")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = load_data("mnist5k", seed=0)
    epochs = 3.0 if args.quick else 30.0
    dense = train_dense(data, epochs)
    dense_m = evaluate(dense, ClassificationTask(), data.val_batches())
    print(f"dense: {dense_m}", file=sys.stderr, flush=True)
    check = check_woodfisher()
    assert check < 1e-9, f"WoodFisher oracle check failed: {check}"
    sparsities = (0.9,) if args.quick else SPARSITIES
    keys, res = run_all(dense, data, sparsities, args.quick)
    body = report(dense_m, keys, res, sparsities, epochs, check)
    body += f"\n\nTotal bench runtime: {time.perf_counter() - t0:.0f} s."
    print(body)
    if args.quick:
        print("(quick run: BENCHMARKS.md not written)")
        return
    update_section("oneshot", "One-shot pruning without fine-tuning: MLP 784-40-20-10",
                   "python bench/bench_oneshot.py", body)  # fmt: skip
    print("wrote BENCHMARKS.md section oneshot")


if __name__ == "__main__":
    main()
