"""Float64 oracles for the KFAC/EKFAC/OBS tests, built from definitions with torch.func.

Nothing here uses prunekit's hooks or row builders: layer inputs come from an explicit
functional forward, per-position output gradients from zero "deltas" added to each layer's
output, conv patches from explicit slicing of the padded input.

Block convention (as in criteria.kfac): per group, [W_g | b_g] of shape (o, i'), vec
row-major, so a per-example gradient g a^T has vec kron(g, a) and KFAC is kron(G, A).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from prunekit.types import ClassificationTask

TASK = ClassificationTask()


def tiny_mlp(seed: int = 0) -> nn.Module:
    """6-5-4-3 tanh MLP (float64); the middle layer has no bias."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """2x7x7 -> conv(stride 2, pad 1) -> conv(dilation 2, pad 2, groups 2) -> linear(3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()


def tiny_cnn1d(seed: int = 0) -> nn.Module:
    """2x9 -> conv1d(stride 2, pad 1, dilation 2, no bias) -> linear(3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()


def data(model: nn.Module, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random inputs fitting the model's first layer and random labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    first = model[0]
    if isinstance(first, nn.Linear):
        shape = (n, first.in_features)
    elif isinstance(first, nn.Conv1d):
        shape = (n, 2, 9)
    else:
        shape = (n, 2, 7, 7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _layer_op(m: nn.Module, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if isinstance(m, nn.Linear):
        return F.linear(h, w, b)
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    return conv(h, w, b, m.stride, m.padding, m.dilation, m.groups)


def forward(model: nn.Module, params: dict, x: Tensor, deltas: dict) -> tuple[Tensor, dict]:
    """Functional forward with deltas added to layer outputs; returns (logits, layer inputs)."""
    h, inputs = x, {}
    for name, m in model.named_children():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            inputs[name] = h
            bias = params.get(f"{name}.bias")
            h = _layer_op(m, h, params[f"{name}.weight"], bias) + deltas[name]
        else:
            h = functional_call(m, {}, (h,))
    return h, inputs


def layer_names(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv children."""
    return [
        n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]


def per_example(model: nn.Module, x: Tensor, y: Tensor, labels: str):
    """(param grads name -> (N, terms, *shape), output grads name -> (N, terms, *out_shape)).

    Terms: 'empirical' = one term, the cross-entropy with y; 'exact' = one term per class,
    -log p_c * sqrt(p_c) with p detached (their squared gradients sum to the true Fisher).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        _, inputs = forward(model, params, x, {n: 0.0 for n in layer_names(model)})
        outs = {
            n: _layer_op(
                model.get_submodule(n), inputs[n], params[f"{n}.weight"], params.get(f"{n}.bias")
            )
            for n in layer_names(model)
        }
    deltas = {n: torch.zeros_like(o[0]) for n, o in outs.items()}

    def terms(p, d, xi, yi):
        logits, _ = forward(model, p, xi[None], {k: v[None] for k, v in d.items()})
        logp = torch.log_softmax(logits[0], -1)
        if labels == "empirical":
            return -(logp * yi).sum()[None]  # yi: one-hot row
        return -logp * logp.detach().exp().sqrt()

    jac = vmap(jacrev(terms, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    return jac(params, deltas, x, F.one_hot(y, 3).to(x.dtype))


def patches(m: nn.Module, x: Tensor) -> Tensor:
    """Input patches by explicit slicing: (N, positions, C_in * prod(kernel)), channel-major."""
    if isinstance(m, nn.Linear):
        return x[:, None, :]
    if isinstance(m, nn.Conv1d):
        x = x[:, :, None, :]
        k, s, p, d = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
    else:
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    h_out = (xp.shape[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (xp.shape[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for i in range(h_out):
        for j in range(w_out):
            r0, c0 = i * s[0], j * s[1]
            patch = xp[
                :, :, r0 : r0 + d[0] * (k[0] - 1) + 1 : d[0], c0 : c0 + d[1] * (k[1] - 1) + 1 : d[1]
            ]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def groups_of(m: nn.Module) -> int:
    """Conv groups (1 for Linear)."""
    return getattr(m, "groups", 1)


def factor_oracle(model, x, y, labels, name) -> tuple[Tensor, Tensor]:
    """(A (g, i', i'), G (g, o, o)) of layer ``name`` from their definitions (KFC for convs)."""
    m = model.get_submodule(name)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        _, inputs = forward(model, params, x, {n: 0.0 for n in layer_names(model)})
    a = patches(m, inputs[name])  # (N, T, C_in * k)
    _, dgrads = per_example(model, x, y, labels)
    gy = dgrads[name]  # (N, terms, C_out, *spatial)
    n, n_terms = gy.shape[:2]
    gy = gy.reshape(n, n_terms, gy.shape[2], -1).transpose(2, 3)  # (N, terms, T, C_out)
    t = gy.shape[2]
    grp = groups_of(m)
    a_list, g_list = [], []
    for k in range(grp):
        ak = a.reshape(n, a.shape[1], grp, -1)[:, :, k]
        if m.bias is not None:
            ak = torch.cat([ak, torch.ones(*ak.shape[:-1], 1, dtype=ak.dtype)], -1)
        gk = gy.reshape(n, n_terms, t, grp, -1)[..., k, :]
        a_list.append(torch.einsum("nti,ntj->ij", ak, ak) / n)
        g_list.append(torch.einsum("nsto,nstp->op", gk, gk) / (n * t))
    return torch.stack(a_list), torch.stack(g_list)


def block_grads(model, pgrads, name) -> Tensor:
    """Per-example, per-term gradient blocks [W_g | b_g]: (N, terms, groups, o, i')."""
    m = model.get_submodule(name)
    w = pgrads[f"{name}.weight"]
    n, n_terms, out = w.shape[:3]
    grp = groups_of(m)
    block = w.reshape(n, n_terms, grp, out // grp, -1)
    if m.bias is not None:
        b = pgrads[f"{name}.bias"].reshape(n, n_terms, grp, out // grp, 1)
        block = torch.cat([block, b], -1)
    return block


def dense_fisher(model, x, y, labels, name) -> Tensor:
    """Dense Fisher block per group (g, o*i', o*i'), mean over examples, sum over terms."""
    pgrads, _ = per_example(model, x, y, labels)
    blocks = block_grads(model, pgrads, name)
    n, n_terms, grp = blocks.shape[:3]
    v = blocks.reshape(n * n_terms, grp, -1).transpose(0, 1)  # (g, N*terms, o*i')
    return v.transpose(1, 2) @ v / n


def kron_basis(u_g: Tensor, u_a: Tensor) -> Tensor:
    """Q = kron(U_G, U_A) per group: (g, o*i', o*i')."""
    return torch.stack([torch.kron(ug, ua) for ug, ua in zip(u_g, u_a, strict=True)])


def dense_from_scaling(u_g: Tensor, scale: Tensor, u_a: Tensor) -> Tensor:
    """Q diag(vec S) Q^T per group."""
    q = kron_basis(u_g, u_a)
    return q @ torch.diag_embed(scale.reshape(scale.shape[0], -1)) @ q.transpose(1, 2)
