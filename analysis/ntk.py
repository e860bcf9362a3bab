"""Tangent-kernel (NTK) alignment of a network on a small probe batch (methods.md section 3).

Conventions used throughout this module:

- n examples, C outputs per example (the model's output for one example, flattened).
- Rows of the Jacobian J (and of the kernel K = J J^T) are indexed by (c, i) in *output-major*
  order: row ``c * n + i`` is output c of example i. The label vector uses the same order:
  y = vec(Y^T) with Y the (n, C) label matrix.
- Centring over examples is K_c = (I_C kron H) K (I_C kron H) with H = I_n - 1 1^T / n, which
  equals centring every Jacobian column over the examples, output by output.
- K is built one parameter tensor at a time (K = sum_l K_l), and a parameter's Jacobian is
  computed in row blocks small enough for ``memory_budget_mb`` (:mod:`prunekit.analysis.ntk_gram`
  builds one tensor's K_l): the full Jacobian of all parameters is never materialised.
- Pruned weights (mask False) are excluded: their Jacobian columns are dropped, so K is the
  kernel of the sparse network's surviving weights.
- With ``capture`` given (criteria.capture.capture, injected by the wiring layer, prunekit.api
  and prunekit.ntklog: this room may not import prunekit.criteria), the weights and biases
  of Linear layers applied once to an (n, in) batch get their exact K_l from layer inputs
  and output gradients instead (:mod:`prunekit.analysis.ntk_factored`); everything else
  stays on the jacrev path.
- Under torch.distributed (initialised, world > 1) :func:`ntk_alignment` is a collective: each
  rank builds the K_l of its share of the tensors (:func:`balance_tensors`), and one
  all-reduce (sum) gives every rank the same K and per-layer values (:func:`_shared_kernel`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prunekit.analysis.ntk_factored import Capture, factored_kernel, linear_factors, linear_tensors
from prunekit.analysis.ntk_gram import (  # noqa: F401 - Block, _plan_blocks, default_kernel_params:
    # importable from here as before ntk_gram.py was split off (tests, benches)
    Block,
    _check_budget_positive,
    _check_mask_shapes,
    _compute_dtype,
    _evaluation_mode,
    _jacobian_budget,
    _layer_kernel,
    _masks_for,
    _model_outputs,
    _plan_blocks,
    _prepare_inputs,
    _resolve_params,
    center_kernel,
    default_kernel_params,
)
from prunekit.errors import SettingError, choice_error
from prunekit.types import TASK_KINDS, Masks

log = logging.getLogger(__name__)


def _iter_layer_kernels(
    model: nn.Module,
    inputs: Tensor,
    masks: Masks | None = None,
    params: Sequence[str] | None = None,
    centered: bool = True,
    memory_budget_mb: float = 256.0,
    capture: Capture | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (parameter name, K_l) one tensor at a time, K_l float64 of shape (C, n, C, n).

    K_l[c, i, d, j] = <d f_c(x_i) / d theta_l, d f_d(x_j) / d theta_l> over the surviving
    (mask True) entries of theta_l; the total kernel is the sum over l. ``centered`` centres
    over examples (see :func:`center_kernel`). The model is in eval mode while the generator
    runs and its flags are restored when it finishes or is closed; nothing else is touched.
    Only one tensor's Jacobian blocks (bounded by ``memory_budget_mb``) exist at a time;
    with ``capture``, the Linear factors (n * (in + C * out) numbers per layer) are held too.
    """
    _check_budget_positive(memory_budget_mb)
    names = _resolve_params(model, masks, params)
    inputs, _ = _prepare_inputs(model, inputs)
    with _evaluation_mode(model):
        n_outputs = _model_outputs(model, inputs)
        budget = _jacobian_budget(memory_budget_mb, inputs.shape[0], n_outputs)
        # Detached aliases (no copies): torch.func then differentiates one tensor only, and
        # autograd never records anything on the model's own parameters.
        frozen = {k: v.detach() for k, v in model.named_parameters()}
        keeps = _masks_for(names, masks, frozen)
        factors = {}
        if capture is not None:
            tensors = linear_tensors(model, names)
            if tensors:
                factors = linear_factors(model, frozen, tensors, inputs, n_outputs, capture)
            log.debug("NTK: factored path for %s", sorted(factors))
        for name in names:
            if name in factors:
                mask = None if masks is None else masks.get(name)
                kernel = factored_kernel(factors.pop(name), mask, budget)
            else:
                kernel = _layer_kernel(model, frozen, name, inputs, n_outputs, keeps[name], budget)
            yield name, center_kernel(kernel, inplace=True) if centered else kernel


def tangent_kernel(
    model: nn.Module,
    inputs: Tensor,
    masks: Masks | None = None,
    params: Sequence[str] | None = None,
    centered: bool = True,
    memory_budget_mb: float = 256.0,
    capture: Capture | None = None,
) -> dict[str, Tensor]:
    """Per-tensor tangent kernels as (C*n, C*n) float64 matrices, rows in (c, i) order.

    Same arguments and conventions as :func:`ntk_alignment`; the total kernel is
    ``sum(result.values())``. Holds every K_l at once: for diagnostics and tests. Not a
    collective: under torch.distributed every rank computes every K_l itself.
    """
    out = {}
    for name, kernel in _iter_layer_kernels(
        model, inputs, masks, params, centered, memory_budget_mb, capture
    ):
        size = kernel.shape[0] * kernel.shape[1]
        out[name] = kernel.reshape(size, size)
    return out


def label_vector(
    targets: Tensor,
    n_outputs: int,
    targets_kind: str = "classification",
    num_classes: int | None = None,
    centered: bool = True,
) -> Tensor:
    """y = vec(Y^T), float64 of length C*n in (c, i) order, Y the (n, C) label matrix.

    classification: integer class indices (n,) become one-hot rows (``num_classes`` must equal
    the model's C when given); an (n, C) float matrix is used as is (soft labels).
    regression: targets reshaped to (n, C). ``centered`` subtracts the mean over examples.
    """
    if targets_kind not in TASK_KINDS:
        raise choice_error("targets_kind", targets_kind, TASK_KINDS)
    if num_classes is not None and num_classes != n_outputs:
        raise SettingError(
            f"num_classes={num_classes} but the model has {n_outputs} outputs per example; "
            "they must match (all outputs form the kernel)"
        )
    n = targets.shape[0]
    if targets_kind == "classification" and not targets.is_floating_point():
        flat = targets.reshape(-1).long()
        if flat.numel() != n or flat.min() < 0 or flat.max() >= n_outputs:
            raise SettingError(
                f"classification targets must be n={n} class indices in [0, {n_outputs}); "
                f"got shape {tuple(targets.shape)}, range [{int(flat.min())}, {int(flat.max())}]"
            )
        labels = nn.functional.one_hot(flat.cpu(), n_outputs).double()
    else:
        labels = targets.detach().cpu().double().reshape(n, -1)
        if labels.shape[1] != n_outputs:
            raise SettingError(
                f"targets of shape {tuple(targets.shape)} give {labels.shape[1]} values per "
                f"example; the model has {n_outputs} outputs"
            )
    if centered:
        labels = labels - labels.mean(dim=0, keepdim=True)
    return labels.T.reshape(-1)


def kernel_alignment(kernel: Tensor, y: Tensor) -> float:
    """y^T K y / (||K||_F ||y||^2); in [0, 1] for PSD K. NaN when K = 0 or y = 0 (undefined)."""
    kernel = kernel.reshape(y.numel(), y.numel()).double()
    y = y.to(kernel.device, torch.float64)
    denom = float(torch.linalg.matrix_norm(kernel)) * float(y @ y)
    if denom == 0.0:
        return math.nan
    return float(y @ kernel @ y) / denom


def effective_rank(kernel: Tensor) -> float:
    """exp(-sum_k p_k log p_k), p_k = lambda_k / sum(lambda), lambda the eigenvalues of K.

    Negative round-off eigenvalues are clipped to 0 and 0 log 0 = 0. Ranges from 1 (one
    direction) to C*n (isotropic kernel); 0.0 for K = 0. Eigenvalues are computed in K's
    dtype when it is float32 or float64 (float32: about twice as fast), else in float64.
    """
    size = int(math.isqrt(kernel.numel()))
    matrix = kernel.reshape(size, size)
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.double()
    eig = torch.linalg.eigvalsh(matrix).double().clamp_min(0.0)
    total = float(eig.sum())
    if total == 0.0:
        return 0.0
    p = eig[eig > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group; (0, 1) otherwise."""
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tensor_costs(
    model: nn.Module,
    names: Sequence[str],
    n_outputs: int,
    masks: Masks | None = None,
    capture: Capture | None = None,
) -> dict[str, int]:
    """Estimated multiply-adds of each K_l divided by n^2 (n is common to every tensor).

    jacrev path: the (C n) x (C n) Gram of numel columns, C^2 numel. Factored Linear weight
    (out, in): C^2 out (output-gradient Gram) + in (input Gram), + out * in when masked (the
    masked formula's B); factored bias: C^2 out. Jacobian and backward passes are left out:
    they grow like n, the Grams like n^2. Depends only on shapes, which path a tensor takes
    and whether its mask prunes anything, so every rank of a job gets the same numbers.
    """
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    factored = linear_tensors(model, names) if capture is not None else {}
    costs = {}
    for name in names:
        shape, squared = shapes[name], n_outputs**2
        if name not in factored:
            costs[name] = squared * math.prod(shape)
        elif factored[name][1] == "bias":
            costs[name] = squared * shape[0]
        else:
            mask = None if masks is None else masks.get(name)
            masked = mask is not None and not bool(mask.all())
            costs[name] = squared * shape[0] + shape[1] + (shape[0] * shape[1] if masked else 0)
    return costs


def balance_tensors(costs: dict[str, int], world: int) -> list[list[str]]:
    """Split the tensors over ``world`` ranks: greedy, largest cost first, to the least loaded.

    Deterministic (equal costs keep the order of ``costs``, equal loads go to the lower rank),
    so every rank computes the same split without communicating. Returns one list per rank,
    each in the order of ``costs``; a rank gets [] when there are fewer tensors than ranks.
    The largest tensor bounds the speed-up: tensors are never split between ranks.
    """
    order = {name: i for i, name in enumerate(costs)}
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(costs, key=lambda k: (-costs[k], order[k])):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += costs[name]
        shares[rank].append(name)
    return [sorted(share, key=order.__getitem__) for share in shares]


def _accumulate(
    layer_kernels, labels, per_layer: bool, total: Tensor | None = None
) -> tuple[Tensor, dict, Tensor, list]:
    """(K, per-layer alignments, y, names computed) from one process's (name, K_l) stream.

    labels: C -> y (see :func:`label_vector`); total: a (C, n, C, n) float64 buffer to add
    into, or None to reuse the first K_l as the running sum (no extra buffer).
    """
    per, y, done = {}, None, []
    for name, kernel in layer_kernels:
        if y is None:
            y = labels(kernel.shape[0]).to(kernel.device)
        if per_layer:
            per[name] = kernel_alignment(kernel, y)
        total = kernel if total is None else total.add_(kernel)
        done.append(name)
    return total, per, y, done


def _shared_kernel(kernel_args: tuple, labels, per_layer: bool, rank: int, world: int):
    """:func:`_accumulate`'s values on every rank of a torch.distributed job.

    kernel_args: the arguments of :func:`_iter_layer_kernels` (model, inputs, masks, params,
    centered, memory_budget_mb, capture). Everything that can reject the arguments runs on
    every rank before the collective, so a bad argument fails all ranks alike instead of
    leaving the others waiting. This rank adds the K_l of its share into K and writes the
    per-layer alignment of each (a scalar of K_l alone) into its slot; one all-reduce (sum)
    of [K, per-layer scalars] completes both. Only (C n)^2 + L float64 numbers travel, never
    the L per-layer blocks; non-owners add zeros, so an owner's NaN (undefined) stays NaN.
    """
    model, inputs, masks, params, _, memory_budget_mb, capture = kernel_args
    _check_budget_positive(memory_budget_mb)
    names = _resolve_params(model, masks, params)
    _check_mask_shapes(names, masks, dict(model.named_parameters()))
    prepared, _ = _prepare_inputs(model, inputs)
    with _evaluation_mode(model):
        n_outputs = _model_outputs(model, prepared)
    n = prepared.shape[0]
    _jacobian_budget(memory_budget_mb, n, n_outputs)
    y = labels(n_outputs).to(prepared.device)
    mine = balance_tensors(tensor_costs(model, names, n_outputs, masks, capture), world)[rank]
    size, slots = (n_outputs * n) ** 2, len(names) if per_layer else 0
    # One buffer holds both, so one collective; K is a view of it (no copy before sending).
    shared = torch.zeros(size + slots, dtype=torch.float64, device=prepared.device)
    total = shared[:size].view(n_outputs, n, n_outputs, n)
    if mine:
        stream = _iter_layer_kernels(*kernel_args[:3], mine, *kernel_args[4:])
        _, values, _, _ = _accumulate(stream, lambda _c: y, per_layer, total)
        for name, value in values.items():
            shared[size + names.index(name)] = value
    dist.all_reduce(shared)
    per = {name: float(shared[size + i]) for i, name in enumerate(names)} if per_layer else {}
    return total, per, y, mine


def ntk_alignment(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    masks: Masks | None = None,
    per_layer: bool = True,
    centered: bool = True,
    targets_kind: str = "classification",
    num_classes: int | None = None,
    params: Sequence[str] | None = None,
    memory_budget_mb: float = 256.0,
    capture: Capture | None = None,
    spectrum: bool = True,
    distributed: bool = True,
) -> dict:
    """Tangent-kernel alignment of ``model`` on one probe batch (Baratin et al. 2021).

    inputs: (n, ...) tensor the model takes as a batch; targets: (n,) class indices or (n, C)
    values (``targets_kind`` 'classification' or 'regression'). K is the (C*n) x (C*n) Gram
    matrix of the Jacobian rows d f_c(x_i) / d theta over the kernel parameters: ``params``
    (names) if given, else the names in ``masks``, else all Linear/Conv/recurrent weights.
    Entries with mask False are excluded (the kernel of the sparse network); masks=None keeps
    every entry, zero or not. ``centered`` centres Jacobians and labels over the examples.

    Returns a dict: ``alignment`` = y^T K y / (||K||_F ||y||^2) in [0, 1] (NaN if undefined);
    ``per_layer``: name -> the same with K_l (that tensor alone; K = sum K_l), {} unless
    ``per_layer``; ``effective_rank`` = exp(entropy of the normalised eigenvalues of K);
    ``trace`` = tr(K) / n; ``n``; ``outputs`` = C. Runs in eval mode in the model's dtype
    (float64 if the model is float64, else float32; K accumulates in float64) and leaves no
    trace. Peak extra memory stays near ``memory_budget_mb``: Jacobians are built one tensor
    at a time, in row blocks (over examples, then outputs) when one tensor's would not fit.

    ``capture``: None (every tensor on the per-example jacrev path), or a hook factory with
    the signature of ``prunekit.criteria.capture.capture``; then Linear weights and biases
    applied once to an (n, in) batch use the exact factored kernel (orders of magnitude
    faster), assuming examples do not interact in the eval-mode forward. The effective rank
    is the one O((C n)^3) step (an eigendecomposition in the model's dtype, about 0.05 s for
    C n = 1000 on 2 cores); ``spectrum=False`` skips it and returns ``effective_rank`` None.

    ``distributed`` (default True) only matters inside an initialised torch.distributed group
    of world > 1: the call is then a collective (every rank must make it, with the same model,
    inputs, targets and masks); each rank computes the K_l of its share of the tensors
    (:func:`balance_tensors` on :func:`tensor_costs`) and one all-reduce gives all ranks the
    same K, so every value returned is the same on every rank and equals one process's up to
    float summation order. ``distributed=False`` computes everything locally (e.g. on one rank
    only). ``blocks_computed`` lists the tensors whose K_l this process computed (all of them
    outside a job); the rest came from other ranks.
    """
    if targets.shape[0] != inputs.shape[0]:
        raise SettingError(
            f"targets hold {targets.shape[0]} examples but inputs hold {inputs.shape[0]}"
        )

    def labels(n_outputs: int) -> Tensor:
        return label_vector(targets, n_outputs, targets_kind, num_classes, centered)

    kernel_args = (model, inputs, masks, params, centered, memory_budget_mb, capture)
    rank, world = _rank_and_world(distributed)
    if world > 1:
        total, per, y, done = _shared_kernel(kernel_args, labels, per_layer, rank, world)
    else:
        total, per, y, done = _accumulate(_iter_layer_kernels(*kernel_args), labels, per_layer)
    n_outputs, n = total.shape[0], total.shape[1]
    flat = total.reshape(n_outputs * n, n_outputs * n)
    return {
        "alignment": kernel_alignment(flat, y),
        "per_layer": per,
        # float32 eigenvalues for a float32 model: half the time, and the entropy of the
        # spectrum is insensitive to the round-off of its smallest eigenvalues.
        "effective_rank": effective_rank(flat.to(_compute_dtype(model))) if spectrum else None,
        "trace": float(flat.diagonal().sum()) / n,
        "n": n,
        "outputs": n_outputs,
        "blocks_computed": done,
    }
