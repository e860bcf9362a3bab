"""One tensor's tangent kernel K_l = J_l J_l^T, within a memory budget (used by ntk.py).

The conventions are those of :mod:`prunekit.analysis.ntk`: rows in output-major (c, i)
order, kernels of shape (C, n, C, n) in float64. A tensor's per-example Jacobian
(torch.func ``vmap(jacrev)``) is built in row blocks (over examples, then outputs) small
enough for the budget, with pruned columns gathered out or zeroed; the model runs in eval
mode and its parameters are only read through detached aliases. Also here: resolving which
tensors form the kernel, preparing inputs, checking masks, and centring.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from prunekit.errors import ModelError, SettingError
from prunekit.types import Masks

# The logger of the NTK as a whole (users filter on it), not this file's own name.
log = logging.getLogger("prunekit.analysis.ntk")

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
