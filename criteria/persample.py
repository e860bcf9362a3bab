"""Per-example gradient statistics of Linear and Conv weights from captured inputs/outputs.

For an example i with layer input a_i and output gradient g_i, the weight gradient is
sum over positions of outer(g_it, a_it). These helpers return sum_i (grad_i)^2 without
materialising more than a bounded chunk of per-example gradients.
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


def linear_sq_grads(x: Tensor, gy: Tensor) -> Tensor:
    """sum_i (dL_i/dW)^2 for a Linear layer; x (N, ..., in), gy (N, ..., out) -> (out, in)."""
    n = x.shape[0]
    return _sum_sq_outer(gy.reshape(n, -1, gy.shape[-1]), x.reshape(n, -1, x.shape[-1]))


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
