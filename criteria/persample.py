"""Per-example gradient statistics of Linear, Conv and Embedding weights from hooks.

For an example i with layer input a_i and output gradient g_i, the weight gradient is
sum over positions of outer(g_it, a_it) (for an Embedding, a_it is the one-hot of token
id_it). These helpers return sum_i (grad_i)^2 without materialising more than a bounded
chunk of per-example gradients.

Padding. A Linear applied to a padded sequence x (N, T, ..., D) (or an Embedding to ids
(N, T, ...)) sees every position, real or not. When the task gives a position mask (N, T)
(``Task.position_mask``) matching the first two position dimensions, ``position_weights``
turns it into (N, positions) 0/1 weights, and the rows of padded positions (inputs and
output gradients alike) are multiplied by 0: they add nothing to any curvature statistic,
even in a model that lets padding leak into its outputs. Layers whose inputs do not start
with (N, T) (a head on pooled (N, D) features) are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Largest number of per-example gradient entries built at once (about 128 MB in float32).
_CHUNK_ENTRIES = 32 * 1024 * 1024


def supports_fast_path(module: nn.Module) -> bool:
    """True for Linear and for Conv1d/Conv2d geometries that ``conv_patches`` handles."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.padding_mode != "zeros":
        return False
    return not isinstance(module.padding, str) or module.padding == "valid"


def conv_patches(module: nn.Module, x: Tensor) -> Tensor | None:
    """Unfolded input patches (N, C_in*prod(kernel), L) of a Conv1d/Conv2d, or None.

    None means the layer's geometry is not handled here (string padding other than
    'valid', non-zero padding modes, Conv3d); callers then use a generic path.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.padding_mode != "zeros":
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = (0,) * len(module.kernel_size)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *padding), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def shared_parameters(model: nn.Module) -> set[str]:
    """Names of parameters registered under more than one name (tied weights).

    Hooks on one module see only that module's use of a tied weight, so such weights
    must take a path that differentiates the whole model (the exact per-example path).
    """
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def embedding_hookable(module: nn.Module) -> bool:
    """True for an Embedding whose per-example gradients ``embedding_sq_grads`` gives.

    scale_grad_by_freq scales gradients by token counts of the whole mini-batch, which has
    no per-example meaning: such layers take the exact per-example path instead.
    """
    return isinstance(module, nn.Embedding) and not module.scale_grad_by_freq


def position_weights(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor | None:
    """(N, L) float 0/1 weights of the L positions of one call's input ``x``; or None.

    Positions: x.shape[:-1] for a Linear (x (N, T, ..., D)), x.shape for an Embedding (ids
    (N, T, ...)). mask: (N, T) bool, True = real token. The weights are ``mask`` repeated
    over the position dimensions after T, flattened in row-major order (the order of
    ``x.reshape(N, -1, D)``), float64. None (every position counts) unless the positions
    have at least 2 dimensions and start with mask.shape -- so a classifier head on pooled
    (N, D) features, or any other module, is unaffected.
    """
    if isinstance(module, nn.Linear):
        positions = tuple(x.shape[:-1])
    elif isinstance(module, nn.Embedding):
        positions = tuple(x.shape)
    else:
        return None
    if mask is None or len(positions) < 2 or positions[:2] != tuple(mask.shape):
        return None
    w = mask.to(device=x.device, dtype=torch.float64)
    w = w.reshape(*mask.shape, *([1] * (len(positions) - 2)))
    return w.expand(*positions).reshape(positions[0], -1)


def _sum_sq_outer(g: Tensor, a: Tensor) -> Tensor:
    """sum_i (g_i^T a_i)^2 for g (N, L, out) and a (N, L, in); result (out, in)."""
    n, _, out_dim = g.shape
    in_dim = a.shape[-1]
    if g.shape[1] == 1:  # no weight sharing: square of an outer product factorises
        return g[:, 0].pow(2).T @ a[:, 0].pow(2)
    acc = torch.zeros(out_dim, in_dim, dtype=g.dtype, device=g.device)
    step = max(1, _CHUNK_ENTRIES // max(1, out_dim * in_dim))
    for start in range(0, n, step):
        per_example = torch.bmm(g[start : start + step].transpose(1, 2), a[start : start + step])
        acc += per_example.pow(2).sum(0)
    return acc


def _cat_positions(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _position_rows(
    xs: list[Tensor], gys: list[Tensor], weights: list[Tensor | None] | None, in_dim: bool
) -> tuple[Tensor, Tensor]:
    """Calls' inputs (N, L, in) (ids (N, L) if not in_dim) and grads (N, L, out), all calls
    concatenated along L, padded positions zeroed in the gradients (and inputs)."""
    weights = weights if weights is not None else [None] * len(xs)
    n = xs[0].shape[0]
    a_parts, g_parts = [], []
    for x, gy, w in zip(xs, gys, weights, strict=True):
        a = x.reshape(n, -1, x.shape[-1]) if in_dim else x.reshape(n, -1)
        g = gy.reshape(n, -1, gy.shape[-1])
        if w is not None:  # padded positions contribute nothing (module docstring)
            g = g * w[..., None].to(g.dtype)
            a = a * w[..., None].to(a.dtype) if in_dim else a
        a_parts.append(a)
        g_parts.append(g)
    return _cat_positions(a_parts), _cat_positions(g_parts)


def linear_sq_grads(
    xs: Tensor | list[Tensor],
    gys: Tensor | list[Tensor],
    weights: list[Tensor | None] | None = None,
) -> Tensor:
    """sum_i (dL_i/dW)^2 for a Linear layer -> (out, in).

    xs, gys: the input (N, ..., in) and output gradient (N, ..., out) of one call, or lists
    of them for a module called several times (its per-example gradient sums over calls).
    weights: per call, (N, L) position weights (``position_weights``) or None = all count.
    """
    xs = [xs] if isinstance(xs, Tensor) else list(xs)
    gys = [gys] if isinstance(gys, Tensor) else list(gys)
    a, g = _position_rows(xs, gys, weights, in_dim=True)
    return _sum_sq_outer(g, a)


def embedding_sq_grads(
    module: nn.Embedding,
    ids: list[Tensor],
    gys: list[Tensor],
    weights: list[Tensor | None] | None = None,
) -> Tensor:
    """sum_i (dL_i/dW)^2 for an Embedding -> (num_embeddings, dim).

    ids: per call, token ids (N, ...); gys: per call, the output gradient (N, ..., dim);
    weights as in ``linear_sq_grads``. Example i's gradient has row v = sum of g_it over its
    positions t with id_it = v (none for padding_idx, as autograd does), so rows are summed
    per (example, token) pair before squaring: O(N L dim) memory, never (N, V, dim).
    """
    tokens, g = _position_rows(ids, gys, weights, in_dim=False)  # (N, L), (N, L, dim)
    n, vocab, dim = g.shape[0], module.num_embeddings, g.shape[-1]
    tokens = tokens.long()
    if module.padding_idx is not None:
        g = g * (tokens != module.padding_idx)[..., None].to(g.dtype)
    example = torch.arange(n, device=tokens.device)[:, None].expand_as(tokens)
    pairs, inverse = torch.unique((example * vocab + tokens).reshape(-1), return_inverse=True)
    per_pair = torch.zeros(pairs.numel(), dim, dtype=g.dtype, device=g.device)
    per_pair.index_add_(0, inverse, g.reshape(-1, dim))
    out = torch.zeros(vocab, dim, dtype=g.dtype, device=g.device)
    return out.index_add_(0, pairs % vocab, per_pair.pow(2))


def conv_sq_grads(module: nn.Module, x: Tensor, gy: Tensor) -> Tensor | None:
    """sum_i (dL_i/dW)^2 for Conv1d/Conv2d, shaped like the weight; None if unsupported.

    x: the layer's input (N, C_in, ...), gy: gradient w.r.t. its output (N, C_out, ...).
    Grouped convolutions are handled group by group.
    """
    cols = conv_patches(module, x)
    if cols is None:
        return None
    n, groups = x.shape[0], module.groups
    out_ch = module.out_channels
    cols = cols.reshape(n, groups, -1, cols.shape[-1])  # (N, G, C_in/G*k, L)
    gy = gy.reshape(n, groups, out_ch // groups, -1)  # (N, G, C_out/G, L)
    parts = [
        _sum_sq_outer(gy[:, grp].transpose(1, 2), cols[:, grp].transpose(1, 2))
        for grp in range(groups)
    ]
    return torch.cat(parts, 0).reshape(module.weight.shape)
