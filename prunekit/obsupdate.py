"""The OBS update of a pruning step's surviving weights, and its damping per layer.

'summed' adds up single-weight OBS updates (``criteria.obs_update``, damping 1e-3 as
before); 'joint' solves the joint system per layer (``criteria.joint_update``, both
Kronecker factors, conjugate gradients); 'rows' solves it per output row against the
layer's input factor A (``criteria.rows_update``, the OBC/SparseGPT reconstruction form:
exact where a row is cheap to solve, SparseGPT's sequential pass elsewhere). A bad damping
makes an OBS update worse than none (oBERT's warning), so for 'joint' and 'rows' the damping
of each layer is chosen on examples the model never trained on (the validation set's
first HELD_OUT; training examples after the scoring ones when there is no validation
set): layer by layer in target order (in at most ``MAX_GROUPS`` consecutive groups of
layers, so deep models pay a bounded search), each candidate of ``DAMPINGS`` (and no update
at all) is applied to that layer or group alone, on top of the choices already made for
earlier ones, and the one with the lowest loss is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunekit.criteria import joint_update, obs_update, rows_update
from prunekit.data import DataBundle
from prunekit.finetune import evaluate
from prunekit.prune.masks import apply_masks
from prunekit.types import Masks, Task, batch_to, num_rows, take_rows

DAMPINGS = (1e-2, 1e-1, 1.0)  # below 1e-2 CG converges slowly and rarely wins
HELD_OUT = 512  # examples: enough to rank 4 candidates, cheap next to a curvature fit
NONE = "none"
SOLVERS = {"joint": joint_update, "rows": rows_update}  # the updates whose damping is chosen
# A search costs 1 + 3 x groups evaluations of the held-out examples per step: one group per
# layer made a 36-layer encoder's 2-step run 4.6x obd's time (617 vs 133 s), nearly all of it
# in the search; MLPs (<= 8 factored layers) keep one group per layer.
MAX_GROUPS = 8


def held_out_batches(data: DataBundle, score_examples: int, device, batch: int = 256):
    """(batches, source): the validation set's first HELD_OUT examples, else (no validation
    examples) up to HELD_OUT training examples after the first ``score_examples``.

    Validation first because the model never trained on it: chosen on training examples it
    had fitted, the damping favoured updates that kept the training fit; measured on a test
    half neither choice saw (BENCHMARKS.md `default_*`), damping chosen on validation was
    0.3 point better on the AdamW MLP at 90% and level on the other two.
    """
    if data.n_val > 0:
        x, y, part, source = data.x_val, data.y_val, slice(0, HELD_OUT), "validation"
    else:
        n = data.n_train
        part = slice(min(n, score_examples), min(n, score_examples + HELD_OUT))
        x, y, source = data.x_train, data.y_train, "train"
    rows = take_rows(x if y is None else (x, y), part)
    size = num_rows(rows if y is None else rows[0])
    chunks = [batch_to(take_rows(rows, slice(i, i + batch)), device) for i in range(0, size, batch)]
    first, last = part.start, part.start + size
    return chunks, f"{source}[{first}:{last}]"


def _loss(model: nn.Module, task: Task, batches: list) -> float:
    return float(evaluate(model, task, batches)["loss"])


def _layer_params(deltas: dict[str, Tensor], layer: str, biases: dict[str, str]) -> list[str]:
    names = [layer] + ([biases[layer]] if layer in biases else [])
    return [n for n in names if n in deltas]


def damping_groups(layers: list[str], most: int = MAX_GROUPS) -> list[list[str]]:
    """``layers`` (target order) cut into at most ``most`` consecutive groups of near-equal
    size that each choose one damping: every layer alone up to ``most`` layers."""
    count = min(len(layers), most)
    bounds = [round(i * len(layers) / count) for i in range(count + 1)] if count else [0]
    return [layers[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def choose_damping(
    model: nn.Module, task: Task, curvature, masks: Masks, batches: list, mode: str = "joint"
) -> tuple[dict[str, Tensor], dict[str, float | str]]:
    """(deltas, choice) of the ``mode`` update ('joint' or 'rows', see ``SOLVERS``) with
    each layer's damping chosen on ``batches`` (one choice per ``damping_groups`` group).

    Call with the weights BEFORE the step's removal (the update needs the removed values);
    returns deltas in ``joint_update``'s form (removed weights end at zero; a layer whose
    best choice is no update gets only its removals) and layer -> damping or 'none'. The
    model is left as it was.
    """
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    layers = [n for n in masks if n in getattr(curvature, "layers", {})]
    biases = {n: curvature.layers[n].bias for n in layers if curvature.layers[n].bias}
    solve = SOLVERS[mode]
    candidates = {d: solve(curvature, params, masks, damping=d) for d in DAMPINGS}
    chosen = {n: torch.where(~masks[n], -before[n], torch.zeros_like(before[n])) for n in masks}
    choice: dict[str, float | str] = {}
    try:
        with torch.no_grad():
            _apply(params, before, chosen)
            apply_masks(model, masks)
            current = None  # loss of the model as chosen so far (later layers: no update)
            for group in damping_groups(layers, MAX_GROUPS):
                # 'none' for this group IS the state chosen so far: its loss is known
                losses = {} if current is None else {NONE: current}
                for key in (NONE, *DAMPINGS):
                    if key not in losses:
                        deltas = None if key == NONE else candidates[key]
                        for layer in group:
                            _set_layer(params, before, chosen, deltas, layer, biases, masks)
                        losses[key] = _loss(model, task, batches)
                best = min(losses, key=lambda k: (losses[k], k == NONE))
                for layer in group:
                    if best != NONE:
                        for n in _layer_params(candidates[best], layer, biases):
                            chosen[n] = candidates[best][n]
                    _set_layer(params, before, chosen, None, layer, biases, masks)
                    choice[layer] = best
                current = losses[best]
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
    return chosen, choice


def _apply(params, before, deltas) -> None:
    for n, d in deltas.items():
        params[n].copy_(before[n] + d.to(before[n].dtype))


def _set_layer(params, before, chosen, deltas, layer, biases, masks) -> None:
    """Give ``layer`` (and its bias) the update ``deltas`` (None = the chosen one so far)."""
    source = chosen if deltas is None else deltas
    for n in [layer] + ([biases[layer]] if layer in biases else []):
        d = source.get(n, chosen.get(n))
        params[n].copy_(before[n] + d.to(before[n].dtype) if d is not None else before[n])
    params[layer].mul_(masks[layer])


def step_deltas(run, curvature, batches) -> tuple[dict[str, Tensor], dict | None]:
    """(deltas, damping choice or None) of the run's update mode for the current masks,
    from the weights before zeroing: 'summed' (damping 1e-3), or 'joint' / 'rows' (damping
    chosen per layer on ``batches``, see the module docstring)."""
    params = dict(run.model.named_parameters())
    if run.settings.update_mode == "summed":
        return obs_update(curvature, params, run.masks, absolute=run.settings.lam), None
    mode = run.settings.update_mode
    return choose_damping(run.model, run.task, curvature, run.masks, batches, mode)
