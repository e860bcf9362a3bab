"""Wanda (Sun et al. 2023): weight magnitude times input-feature norm, forward passes only.

score(W_ij) = |W_ij| * ||X_j||_2, with ||X_j||^2 = sum over every calibration example n and
position t of x_ntj^2 (higher = keep). Input "features" j are the columns of the weight as
a matrix ``weight.reshape(out, -1)``:

- Linear on x (N, ..., D): j indexes D; the positions are every leading dim after N (tokens,
  repeated calls of the module). Padded positions (the task's ``position_mask``) are left
  out, as in KFAC.
- Conv1d/Conv2d (zero or 'valid' padding): j indexes a column of the unfolded input (im2col,
  C_in/groups * prod(kernel)); the positions are the output locations. This is KFAC's A
  factor diagonal times N: ||X_j||^2 = N * A_jj. Grouped convs: each group's rows use the
  norms of that group's input columns.

Every term is a sum over examples, so a batch of N and N batches of one give the same
scores. Targets without a clean input-norm definition (recurrent, embedding, 'other',
Conv3d, 'same'/reflect padding, tied weights, a module the forward never ran through) fall
back to plain magnitude |W|; ``ScoreResult.estimators`` says which target got which
('wanda' or 'magnitude'), and report.json carries that map.

Scope. The paper compares weights per output row; prunekit ranks 'global' (all targets
together) or 'layer' (per target), and this module implements Wanda under those scopes. The
norms grow with sqrt(examples x positions) and the magnitude fallback has no such factor, so
in models with fallback targets prefer scope 'layer'.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from prunekit.criteria.capture import capture, scoring_mode
from prunekit.criteria.kfac import Layer, accumulator_dtype, activation_rows, split_targets
from prunekit.criteria.persample import position_weights
from prunekit.criteria.scores import ScoreResult, TaylorCriterion
from prunekit.errors import SettingError
from prunekit.types import Batch, LabelKey, Masks, Scores, Target, Task


def input_sq_norms(
    model: nn.Module, task: Task, layers: dict[str, Layer], batches: Iterable[Batch]
) -> dict[str, Tensor]:
    """Per target: sum over examples, positions and calls of squared input columns.

    layers: ``kfac.split_targets``'s factorable targets. Result per target: (groups, i) with
    i = weight.numel() / out channels, in the accumulator dtype (float64 for a float64
    model). A target whose module no batch ran through is absent. Runs in eval mode without
    autograd; the model is left exactly as it was (``capture``, ``scoring_mode``).
    """
    modules = dict(model.named_modules())
    dtype = accumulator_dtype(model)
    plain = {ly.module: replace(ly, bias=None) for ly in layers.values()}
    sums: dict[str, Tensor] = {}
    with scoring_mode(model), torch.no_grad(), capture(model, list(plain)) as rec:
        for batch in batches:
            rec.clear()
            mask = task.position_mask(batch)
            task.forward(model, batch)
            for m, layer in plain.items():
                for x in rec.inputs[m]:
                    w = position_weights(modules[m], x, mask)
                    rows = activation_rows(modules[m], layer, x, w).to(dtype)  # (N, g, L, i)
                    part = rows.pow(2).sum(dim=(0, 2))
                    sums[layer.target] = sums.get(layer.target, 0) + part
            rec.clear()
    return sums


def wanda_score(weight: Tensor, sq_norms: Tensor) -> Tensor:
    """|W| * sqrt(sq_norms) per group: weight (out, ...), sq_norms (groups, i) -> weight's shape.

    Computed in ``sq_norms``' dtype.
    """
    groups = sq_norms.shape[0]
    w = weight.detach().to(sq_norms.dtype).reshape(groups, weight.shape[0] // groups, -1)
    return (w.abs() * sq_norms.sqrt()[:, None, :]).reshape(weight.shape)


@dataclass(frozen=True)
class Wanda(TaylorCriterion):
    """Wanda: |W_ij| * ||X_j||_2 over the scoring batches (no gradient, no labels).

    Scores are in the accumulator dtype (float32, float64 for a float64 model). The Taylor
    settings (fisher, labels, ...) are not used; a nonzero ``lam`` is refused.
    """

    uses_gradient: ClassVar[bool] = False
    uses_curvature: ClassVar[bool] = False
    uses_inputs: ClassVar[bool] = True  # one forward pass per scoring example (explain counts it)

    def __post_init__(self) -> None:
        super().__post_init__()
        if float(self.lam) != 0.0:
            raise SettingError(
                f"lambda {self.lam!r} does nothing with criterion 'wanda' (|W| x input "
                "norm has no locality penalty); drop it"
            )

    def evaluate(
        self,
        model: nn.Module,
        task: Task,
        targets: dict[str, Target],
        batches: Iterable[Batch],
        generator: torch.Generator | LabelKey | None = None,
        *,
        masks: Masks | None = None,
        cache: dict | None = None,
    ) -> ScoreResult:
        """Score every target (one forward pass per batch); generator, masks, cache unused.

        Pruned weights are zero, so they score 0 whatever the masks. ``estimators``: target
        -> 'wanda' or 'magnitude' (the fallback, see the module docstring).
        """
        params = dict(model.named_parameters())
        layers, _ = split_targets(model, targets)
        sums = input_sq_norms(model, task, layers, batches) if layers else {}
        dtype = accumulator_dtype(model)
        scores: Scores = {}
        estimators: dict[str, str] = {}
        for name in targets:
            if name in sums:
                scores[name] = wanda_score(params[name], sums[name])
                estimators[name] = "wanda"
            else:
                scores[name] = params[name].detach().abs().to(dtype)
                estimators[name] = "magnitude"
        return ScoreResult(scores, estimators, None)
