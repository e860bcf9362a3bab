"""Tangent-kernel (NTK) alignment of a network on a small probe batch (methods.md section 3).

Conventions used throughout this module:

- n examples, C outputs per example (the model's output for one example, flattened).
- Rows of the Jacobian J (and of the kernel K = J J^T) are indexed by (c, i) in *output-major*
  order: row ``c * n + i`` is output c of example i. The label vector uses the same order:
  y = vec(Y^T) with Y the (n, C) label matrix.
- Centring over examples is K_c = (I_C kron H) K (I_C kron H) with H = I_n - 1 1^T / n, which
  equals centring every Jacobian column over the examples, output by output.
- K is built one parameter tensor at a time (K = sum_l K_l), and a parameter's Jacobian is
  computed in row blocks small enough for ``memory_budget_mb``: the full Jacobian of all
  parameters is never materialised.
- Pruned weights (mask False) are excluded: their Jacobian columns are dropped, so K is the
  kernel of the sparse network's surviving weights.
- With ``capture`` given (criteria.capture.capture, injected by the pipeline: this room may not
  import prunekit.criteria), the weights and biases of Linear layers applied once to an
  (n, in) batch get their exact K_l from layer inputs and output gradients instead
  (:mod:`prunekit.analysis.ntk_factored`); everything else stays on the jacrev path.
- Under torch.distributed (initialised, world > 1) :func:`ntk_alignment` is a collective: each
  rank builds the K_l of its share of the tensors (:func:`balance_tensors`), and one
  all-reduce (sum) gives every rank the same K and per-layer values (:func:`_shared_kernel`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from prunekit.analysis.ntk_factored import Capture, factored_kernel, linear_factors, linear_tensors
from prunekit.errors import ModelError, SettingError, choice_error
from prunekit.types import TASK_KINDS, Masks

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
# Bytes a Jacobian row costs relative to its final size: the vmap(jacrev) output plus the
# transient copy made when masked columns are gathered.
_ROW_OVERHEAD = 2.0
# Below this kept fraction, gathering the kept columns (a copy) beats zeroing them in place,
# because the J J^T product then shrinks with the sparsity.
_GATHER_BELOW = 0.5

Block = tuple[int, int, int, int]  # (first example, end example, first output, end output)


def default_kernel_params(model: nn.Module) -> list[str]:
    """Names of the weights of Linear, Conv1d/2d/3d and LSTM/GRU/RNN layers (no biases/norms).

    Returned in ``model.named_parameters()`` order; these form the kernel when neither
    ``params`` nor ``masks`` is given to :func:`ntk_alignment`.
    """
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, (nn.Linear, *_CONV)) and p_name == "weight":
                names.add(full)
            elif isinstance(module, _RECURRENT) and p_name.startswith(("weight_ih", "weight_hh")):
                names.add(full)
    return [n for n, _ in model.named_parameters() if n in names]


def _resolve_params(
    model: nn.Module, masks: Masks | None, params: Sequence[str] | None
) -> list[str]:
    available = [n for n, _ in model.named_parameters()]
    if params is not None:
        names = list(params)
    elif masks is not None:
        names = list(masks)
    else:
        names = default_kernel_params(model)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SettingError(
            f"kernel parameters {unknown} are not parameters of the model; valid: {available}"
        )
    if not names:
        raise ModelError(
            "no parameters to build the tangent kernel from (no Linear/Conv/recurrent weights); "
            "pass params=[...] with names from model.named_parameters()"
        )
    return names


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own ``training`` flag restored."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def _plan_blocks(n: int, c: int, row_bytes: float, budget_bytes: float) -> list[Block]:
    """Row blocks of the (C*n)-row Jacobian of one tensor that fit ``budget_bytes``.

    One block when the whole Jacobian fits; otherwise two blocks are held at once (for the
    off-diagonal products), so each gets half the budget. Examples are split first; outputs
    are split too when one example's C rows alone exceed the half budget.
    """
    if c * n * row_bytes <= budget_bytes:
        return [(0, n, 0, c)]
    rows = int(budget_bytes // (2 * row_bytes))
    if rows < 1:
        log.warning(
            "one Jacobian row needs %.1f MB, more than half the NTK memory budget; using "
            "single rows",
            row_bytes / 2**20,
        )
        rows = 1
    if rows >= c:
        step = rows // c
        return [(e, min(e + step, n), 0, c) for e in range(0, n, step)]
    return [(e, e + 1, o, min(o + rows, c)) for e in range(n) for o in range(0, c, rows)]


def _block_jacobian(
    model: nn.Module,
    frozen: dict[str, Tensor],
    name: str,
    inputs: Tensor,
    block: Block,
    keep: Tensor | None,
) -> Tensor:
    """Jacobian rows of one block, shape (ne * nc, kept columns), rows in (example, output) order.

    ``keep`` (from :func:`_masks_for`): None = all columns; int64 indices of the surviving
    columns (gathered out); or a 0/1 float vector (dropped columns zeroed in place, no copy).
    """
    e0, e1, c0, c1 = block

    def one_example(p: Tensor, x: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, name: p}, (x.unsqueeze(0),))
        return out.reshape(-1)[c0:c1]

    with warnings.catch_warnings():
        # Recurrent layers fall back to a slow (but exact) vmap rule; say it once in the docs,
        # not once per block.
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        per_example = jacrev(one_example)
        try:
            jac = vmap(per_example, in_dims=(None, 0))(frozen[name], inputs[e0:e1])
        except RuntimeError as err:
            # Some layers have no batching rule over examples (float64 nn.LSTM writes in
            # place); one example at a time gives the same rows. Real errors re-raise here.
            log.debug("NTK %s: vmap over examples failed (%s); looping", name, err)
            jac = torch.stack([per_example(frozen[name], x) for x in inputs[e0:e1]])
    jac = jac.reshape((e1 - e0) * (c1 - c0), -1)
    if keep is None:
        return jac
    if keep.dtype == torch.long:  # indices of the survivors: few of them, gather
        return jac.index_select(1, keep)
    return jac.mul_(keep)  # 0/1 weights: most survive, zero the rest in place


def _put(kernel: Tensor, rows: Block, cols: Block, gram: Tensor) -> None:
    """Add the (example, output)-ordered block product ``gram`` into kernel (C, n, C, n)."""
    e0, e1, c0, c1 = rows
    f0, f1, d0, d1 = cols
    gram = gram.view(e1 - e0, c1 - c0, f1 - f0, d1 - d0).permute(1, 0, 3, 2)
    kernel[c0:c1, e0:e1, d0:d1, f0:f1] += gram.to(kernel.dtype)


def _layer_kernel(
    model: nn.Module,
    frozen: dict[str, Tensor],
    name: str,
    inputs: Tensor,
    n_outputs: int,
    keep: Tensor | None,
    budget_bytes: float,
) -> Tensor:
    """Uncentred kernel of one tensor, float64, shape (C, n, C, n); K_l = J_l J_l^T."""
    n = inputs.shape[0]
    row_bytes = frozen[name].numel() * frozen[name].element_size() * _ROW_OVERHEAD
    blocks = _plan_blocks(n, n_outputs, row_bytes, budget_bytes)
    if len(blocks) > 1:
        log.debug("NTK %s: %d row blocks (%s)", name, len(blocks), blocks[0])
    kernel = torch.zeros(n_outputs, n, n_outputs, n, dtype=torch.float64, device=inputs.device)
    # Upper triangle of block pairs only: K is symmetric, the lower blocks are transposes.
    for a, rows in enumerate(blocks):
        jac_a = _block_jacobian(model, frozen, name, inputs, rows, keep)
        _put(kernel, rows, rows, jac_a @ jac_a.T)
        for cols in blocks[a + 1 :]:
            jac_b = _block_jacobian(model, frozen, name, inputs, cols, keep)
            gram = jac_a @ jac_b.T
            _put(kernel, rows, cols, gram)
            _put(kernel, cols, rows, gram.T)
            del jac_b
        del jac_a
    return kernel


def center_kernel(kernel: Tensor, inplace: bool = False) -> Tensor:
    """(I_C kron H) K (I_C kron H) for K of shape (C, n, C, n), H = I_n - 1 1^T / n.

    Computed as double centring (subtract the example means of both example indices), which
    costs O((Cn)^2) instead of two (Cn)^3 products. ``inplace`` overwrites ``kernel`` (no
    new (Cn)^2 buffers: the per-layer kernels built here are private).
    """
    if not inplace:
        kernel = kernel.clone()
    kernel.sub_(kernel.mean(dim=1, keepdim=True))
    return kernel.sub_(kernel.mean(dim=3, keepdim=True))


def _model_outputs(model: nn.Module, inputs: Tensor) -> int:
    with torch.no_grad():
        out = model(inputs[:1])
    if not isinstance(out, Tensor):
        raise ModelError(
            f"the model returns {type(out).__name__}; the tangent kernel needs a model that "
            "returns one tensor of outputs (wrap it to select the logits)"
        )
    return out[0].numel()


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, else float32: the dtype Jacobians are computed in."""
    first = next(model.parameters(), None)
    if first is None:
        raise ModelError("the model has no parameters; its tangent kernel is empty")
    return torch.float64 if first.dtype == torch.float64 else torch.float32


def _prepare_inputs(model: nn.Module, inputs: Tensor) -> tuple[Tensor, torch.dtype]:
    dtype = _compute_dtype(model)
    first = next(model.parameters())
    inputs = inputs.to(first.device)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    if inputs.shape[0] < 1:
        raise SettingError("inputs hold no examples; pass a batch with at least one example")
    return inputs, dtype


def _check_mask_shapes(names: Sequence[str], masks: Masks | None, params: dict) -> None:
    """SettingError unless every given mask of ``names`` has its parameter's shape."""
    for name in names:
        mask = None if masks is None else masks.get(name)
        if mask is not None and tuple(mask.shape) != tuple(params[name].shape):
            raise SettingError(
                f"mask of {name!r} has shape {tuple(mask.shape)}; the parameter has shape "
                f"{tuple(params[name].shape)}"
            )


def _masks_for(names: list[str], masks: Masks | None, frozen: dict[str, Tensor]) -> dict:
    """Per tensor: None (keep all), survivor indices (int64) or a 0/1 vector (dtype of J)."""
    _check_mask_shapes(names, masks, frozen)
    keeps: dict[str, Tensor | None] = {}
    for name in names:
        mask = None if masks is None else masks.get(name)
        if mask is None:
            keeps[name] = None
            continue
        flat = mask.reshape(-1).to(frozen[name].device).bool()
        # Decided once per tensor, not per block: gathering shrinks J J^T with the sparsity.
        if float(flat.float().mean()) < _GATHER_BELOW:
            keeps[name] = flat.nonzero().squeeze(1)
        else:
            keeps[name] = flat.to(frozen[name].dtype)
    return keeps


def _check_budget_positive(memory_budget_mb: float) -> None:
    if not memory_budget_mb > 0:
        raise SettingError(f"memory_budget_mb={memory_budget_mb!r} must be > 0 (e.g. 256)")


def _jacobian_budget(memory_budget_mb: float, n: int, n_outputs: int) -> float:
    """Bytes left for one tensor's Jacobian blocks once the two float64 kernels are held."""
    kernel_bytes = 2 * (n_outputs * n) ** 2 * 8  # running total + current layer, float64
    budget = memory_budget_mb * 2**20 - kernel_bytes
    if budget <= 0:
        raise SettingError(
            f"memory_budget_mb={memory_budget_mb} is too small: the kernels of n={n} "
            f"examples x C={n_outputs} outputs alone need {kernel_bytes / 2**20:.1f} MB"
        )
    return budget


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
