"""Exact tangent kernels of Linear layers from their factors (no Jacobian materialised).

For a Linear layer s_i = W a_i + b applied once to example i (input a_i, shape (in,)), with
g_ic = d f_c(x_i) / d s_i (shape (out,)), the Jacobian row of W for output c of example i is
the outer product g_ic a_i^T, so (same (c, i) output-major order as :mod:`ntk`)

    K_W[c, i, d, j] = (g_ic . g_jd) (a_i . a_j)                                  (no mask)
    K_W[c, i, d, j] = sum_o g_ic[o] g_jd[o] B[o, i, j],
                      B[o, i, j] = sum_k M[o, k] a_i[k] a_j[k]                    (keep-mask M)
    K_b[c, i, d, j] = sum_o m[o] g_ic[o] g_jd[o]                                  (bias)

The a_i come from one batched forward pass and the g_ic from C backward passes (one per
output c, of sum_i f_c(x_i)); row i of that gradient is g_ic because, in eval mode, example
i's outputs do not depend on the other examples. That is the one assumption this path adds
over the per-example jacrev path: do not use it for models whose eval-mode forward couples
examples (batch statistics, attention across the batch).

Hooks are registered only through the injected ``capture`` function (criteria.capture's
signature: ``capture(model, module_names)`` yielding a recorder with ``inputs``, ``outputs``,
``single_call`` and ``output_grads``); this room never imports prunekit.criteria.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

# capture(model, module_names) -> context manager yielding a recorder (criteria.capture.capture)
Capture = Callable
# factors of one tensor: (a, g) with a (n, in) for a weight or None for a bias, g (C, n, out)
Factors = tuple[Tensor | None, Tensor]


def linear_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """name -> (module name, 'weight' | 'bias') for the kernel tensors the factored path covers.

    Covered: the weight or bias of a module whose forward is nn.Linear's own (subclasses that
    override forward are not), when that parameter object belongs to no other module (tied
    weights get gradients from every use, which the factors of one module do not see).
    """
    owners = Counter(
        id(p)
        for _, module in model.named_modules(remove_duplicate=False)
        for p in module.parameters(recurse=False)
    )
    wanted = set(names)
    out = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            continue
        for attr in ("weight", "bias"):
            full = f"{mod_name}.{attr}" if mod_name else attr
            param = getattr(module, attr)
            if full in wanted and param is not None and owners[id(param)] == 1:
                out[full] = (mod_name, attr)
    return out


def _ran_on_examples(rec, module: str, n: int) -> bool:
    """One call, on an (n, in) batch giving (n, out): row i is example i (not a sequence)."""
    if not rec.single_call(module):
        return False
    inp, out = rec.inputs[module][0], rec.outputs[module][0]
    return inp.dim() == 2 and out.dim() == 2 and inp.shape[0] == n and out.shape[0] == n


def linear_factors(
    model: nn.Module,
    frozen: dict[str, Tensor],
    tensors: dict[str, tuple[str, str]],
    inputs: Tensor,
    n_outputs: int,
    capture: Capture,
) -> dict[str, Factors]:
    """Factors of every tensor in ``tensors`` whose module ran once on the (n, in) batch.

    frozen: detached aliases of all parameters (name -> tensor); the model must already be in
    eval mode. One forward through ``functional_call`` with fresh aliases that require grad
    (so the model's own ``requires_grad`` and ``.grad`` are never touched), then C backward
    passes through ``rec.output_grads``. Tensors left out (module called twice, sequence
    input, not reached) fall back to the jacrev path in the caller.
    """
    n = inputs.shape[0]
    modules = sorted({mod for mod, _ in tensors.values()})
    params = dict(frozen)
    for name in tensors:
        params[name] = frozen[name].detach().requires_grad_(True)
    with torch.enable_grad(), capture(model, modules) as rec:
        out = functional_call(model, params, (inputs,)).reshape(n, -1)
        usable = [m for m in modules if _ran_on_examples(rec, m, n)]
        if not usable or not out.requires_grad:
            return {}
        grads = [rec.output_grads(out[:, c].sum(), usable) for c in range(n_outputs)]
        per_module = {
            m: (rec.inputs[m][0], torch.stack([grad[m][0] for grad in grads])) for m in usable
        }
    factors = {}
    for name, (mod, attr) in tensors.items():
        if mod in per_module:
            a, g = per_module[mod]
            factors[name] = (a if attr == "weight" else None, g)
    return factors


def _masked_weight_kernel(a: Tensor, g: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """sum_o g_ic[o] g_jd[o] B[o, i, j] as (C, n, C, n), examples i in chunks of ``chunk``.

    a: (n, in); g: (C, n, out); mask: (out, in) 0/1 in g's dtype. Per chunk of rows i, only
    columns j >= the chunk's first row are computed (K is symmetric; the rest is mirrored at
    the end): B[o, i, j] is one GEMM (mask times a_i[k] a_j[k] laid out (in, i, j)), then each
    example i gives one (C, out) x (out, C n_j) product. Cost about (out*in*n^2 +
    C^2*n^2*out) / 2 multiply-adds whatever the mask's density.
    """
    n_outputs, n, out = g.shape
    rows = g.permute(1, 0, 2)  # (n_i, C, out)
    cols = g.permute(2, 0, 1).contiguous()  # (out, C, n_j)
    at = a.T.contiguous()  # (in, n)
    result = g.new_zeros(n, n_outputs, n_outputs, n)  # (i, c, d, j)
    first = torch.empty(n, dtype=torch.long, device=g.device)  # first row of i's chunk
    for i0 in range(0, n, chunk):
        i1, width = min(i0 + chunk, n), n - i0
        first[i0:i1] = i0
        pairs = at[:, i0:i1, None] * at[:, None, i0:]  # (in, ic, n_j >= i0)
        b = (mask @ pairs.reshape(at.shape[0], -1)).view(out, i1 - i0, width)
        right = b.permute(1, 0, 2)[:, :, None, :] * cols[:, :, i0:]
        block = torch.bmm(rows[i0:i1], right.reshape(i1 - i0, out, n_outputs * width))
        result[i0:i1, :, :, i0:] = block.view(i1 - i0, n_outputs, n_outputs, width)
    # Entries with j before i's chunk were computed as (j, i): K[c,i,d,j] = K[d,j,c,i],
    # a plain transpose once K is laid out as the (C n, C n) matrix.
    size = n_outputs * n
    kernel = result.permute(1, 0, 2, 3).reshape(size, size)
    index = torch.arange(n, device=g.device)
    mirrored = (index[None, :] < first[:, None]).repeat(n_outputs, n_outputs)
    return torch.where(mirrored, kernel.T, kernel).view(n_outputs, n, n_outputs, n)


def factored_kernel(factors: Factors, mask: Tensor | None, budget_bytes: float) -> Tensor:
    """Uncentred K_l of one Linear weight or bias, float64, shape (C, n, C, n).

    factors: (a, g) from :func:`linear_factors`; mask: bool of the parameter's shape (True =
    keep) or None. Products run in the factors' dtype (the model's), the result is returned
    in float64 like the jacrev path's. ``budget_bytes`` bounds the masked path's chunks.
    """
    a, g = factors
    n_outputs, n, out = g.shape
    flat = g.reshape(n_outputs * n, out)
    if mask is not None and bool(mask.all()):
        mask = None  # all kept: the cheap unmasked formula is exact
    if mask is not None:
        mask = mask.to(device=g.device, dtype=g.dtype)
    if a is None:  # bias: Jacobian rows are g_ic (masked entries dropped)
        left = flat if mask is None else flat * mask
        kernel = (left @ flat.T).view(n_outputs, n, n_outputs, n)
    elif mask is None:
        gram = (flat @ flat.T).view(n_outputs, n, n_outputs, n)
        kernel = gram * (a @ a.T)[None, :, None, :]
    else:
        per_row = (a.shape[1] * n + out * n + out * n_outputs * n) * g.element_size()
        spare = budget_bytes - 3 * (n_outputs * n) ** 2 * g.element_size()  # result, mirror
        # About 8 chunks: the symmetric half then saves ~45% of the work.
        chunk = int(min(-(-n // 8), max(1, spare // per_row)))
        kernel = _masked_weight_kernel(a, g, mask.reshape(out, -1), chunk)
    return kernel.to(torch.float64)
