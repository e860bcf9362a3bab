"""Group (unit) scores for structured pruning: one score per unit of a ``UnitGroup``.

A unit's parameters theta_g are every member entry it owns or is read by (``prune.groups``:
producing rows, biases, BatchNorm entries, the consumer's input columns). Scores, higher =
keep, float64 (size,) per group name (methods.md 9.5):

    magnitude  ||theta_g||_2                        (optionally / the group's mean score)
    lm         (sum_g grad . theta)^2               (first-order Taylor, Molchanov 2019)
    obd        0.5 theta_g^T F_gg theta_g + 0.5 lam ||theta_g||^2
    qm         |-grad . theta_g + 0.5 theta_g^T F_gg theta_g| + 0.5 lam ||theta_g||^2
    obs        the consumer's columns by the structured OBS saliency of the KFAC factor A'
               (the next layer compensates, ``obs_column_update``), the rest as in obd

F_gg: for a Kronecker-factored layer (``Factored``: KFAC's G, A or EKFAC's U_G, S, U_A)
the exact quadratic of the block approximation on the unit's entries, within-group
correlations included: a producing row set R (with its bias column) gives
tr(D^T G D A) for D = the block restricted to rows R (KFAC) or sum S * (U_G^T D U_A)^2
(EKFAC); a consumer's column set J likewise with D restricted to columns J (a conv's
input channel c owns the columns c*k .. c*k+k-1 of ``weight.reshape(out, -1)``). Blocks
of different layers are uncorrelated (KFAC is block diagonal), so the group quadratic is
the sum over its layers. Members of no factored layer (recurrent weights, BatchNorm,
grouped convs, biases of unfactored layers) use the diagonal Fisher: 0.5 sum d theta^2.

Magnitude's ``normalize``: divide each group's scores by their mean, so that a global
ranking compares units against their own group (Torch-Pruning's 'mean' normaliser);
without it, units with more entries (wider fan-in/out) score higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.errors import ModelError, SettingError, choice_error
from prunekit.prune.groups import Member, UnitGroup

GROUP_CRITERIA = ("magnitude", "lm", "qm", "obd", "obs")
# Largest (units x o x i') buffer built at once by the chunked EKFAC paths (~32 MB float64).
_CHUNK_ENTRIES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Factored:
    """One Kronecker-factored layer's curvature, one conv group only (groups == 1).

    weight/bias: parameter names (bias None when absent); shape: weight shape; the block is
    ``[weight.reshape(o, -1) | bias]`` (o, i'). ``G`` (o, o), ``A`` (i', i'): the KFAC
    factors (for EKFAC rebuilt from its basis, U diag(lambda) U^T, as of the basis fit);
    ``u_g`` (o, o), ``s`` (o, i'), ``u_a`` (i', i'): EKFAC's form, None for KFAC. The
    quadratic uses EKFAC's form when present, the OBS column saliency/update G and A.
    """

    weight: str
    bias: str | None
    shape: tuple[int, ...]
    G: Tensor
    A: Tensor
    u_g: Tensor | None = None
    s: Tensor | None = None
    u_a: Tensor | None = None

    @property
    def kernel(self) -> int:
        """Block columns per input channel (prod of the kernel size; 1 for Linear)."""
        return math.prod(self.shape[2:])

    @property
    def ekfac(self) -> bool:
        """True when the EKFAC form (U_G, S, U_A) is present."""
        return self.u_g is not None


def factored_layers(curvature) -> dict[str, Factored]:
    """The factored layers of a KFAC or EKFAC value (``criteria.kfac``/``criteria.ekfac``),
    keyed by weight name, float64; grouped convs (groups > 1) and a ``Diag`` give none."""
    out: dict[str, Factored] = {}
    layers = getattr(curvature, "layers", None) or {}
    basis = getattr(curvature, "basis", None)
    for t, ly in layers.items():
        if ly.groups != 1:
            continue
        if basis is not None:
            u_g, u_a = basis.u_g[t][0].double(), basis.u_a[t][0].double()
            g = u_g @ torch.diag(basis.lambda_g[t][0].double()) @ u_g.T
            a = u_a @ torch.diag(basis.lambda_a[t][0].double()) @ u_a.T
            s = curvature.scaling[t][0].double()
            out[t] = Factored(t, ly.bias, tuple(ly.shape), g, a, u_g, s, u_a)
        else:
            g, a = curvature.G[t][0].double(), curvature.A[t][0].double()
            out[t] = Factored(t, ly.bias, tuple(ly.shape), g, a)
    return out


def unit_index(member: Member, size: int) -> Tensor:
    """(size, blocks * width) int64: the entries of every unit along ``member.dim``."""
    return torch.stack([member.index(j) for j in range(size)])


def member_values(member: Member, size: int, tensor: Tensor) -> Tensor:
    """(size, k) float64: the member's entries of every unit, from a parameter-shaped tensor."""
    idx = unit_index(member, size).to(tensor.device)
    moved = tensor.detach().double().movedim(member.dim, 0)
    return moved[idx.reshape(-1)].reshape(size, -1)


def magnitude_scores(
    groups: list[UnitGroup], params: dict[str, Tensor], normalize: bool = False
) -> dict[str, Tensor]:
    """||theta_g||_2 per unit (group -> (size,) float64); normalize: / the group's mean."""
    out = {}
    for g in groups:
        sq = sum(member_values(m, g.size, params[m.param]).pow(2).sum(1) for m in g.members)
        score = sq.sqrt()
        out[g.name] = score / score.mean().clamp_min(1e-30) if normalize else score
    return out


def taylor_terms(
    groups: list[UnitGroup], params: dict[str, Tensor], grads: dict[str, Tensor]
) -> dict[str, Tensor]:
    """sum over the unit's entries of grad * theta (group -> (size,) float64, signed): the
    first-order loss change of removing the unit is minus this."""
    out = {}
    for g in groups:
        out[g.name] = sum(
            (member_values(m, g.size, params[m.param]) * member_values(m, g.size, grads[m.param]))
            .sum(1)
            for m in g.members
        )  # fmt: skip
    return out


def _sum_blocks(h: Tensor, idx: Tensor) -> Tensor:
    """sum over a, b in idx[u] of h[a, b] for every unit u: h (n, n), idx (units, w)."""
    return h[idx[:, :, None], idx[:, None, :]].sum((1, 2))


def _ekfac_rows(f: Factored, block: Tensor, idx: Tensor) -> Tensor:
    """sum S * (U_G^T D_u U_A)^2, D_u = ``block`` on rows idx[u] only (units, w)."""
    t = block @ f.u_a  # (o, i'): rows of D U_A
    if idx.shape[1] == 1:  # one row: (U_G[r] outer t_r)^2 factorises
        return ((f.u_g.pow(2) @ f.s) * t.pow(2)).sum(1)[idx[:, 0]]
    out = []
    step = max(1, _CHUNK_ENTRIES // max(1, f.s.numel()))
    for a in range(0, idx.shape[0], step):
        sub = idx[a : a + step]
        m = torch.einsum("nwk,nwl->nkl", f.u_g[sub], t[sub])
        out.append((m.pow(2) * f.s).sum((1, 2)))
    return torch.cat(out)


def _ekfac_cols(f: Factored, block: Tensor, idx: Tensor) -> Tensor:
    """sum S * (U_G^T D_u U_A)^2, D_u = ``block`` on columns idx[u] only (units, w)."""
    t = f.u_g.T @ block  # (o, i'): columns of U_G^T D
    if idx.shape[1] == 1:  # one column: (t_c outer U_A[c])^2 factorises
        return (t.pow(2) * (f.s @ f.u_a.pow(2).T)).sum(0)[idx[:, 0]]
    out = []
    step = max(1, _CHUNK_ENTRIES // max(1, f.s.numel()))
    for a in range(0, idx.shape[0], step):
        sub = idx[a : a + step]
        m = torch.einsum("onw,nwl->nol", t[:, sub], f.u_a[sub])
        out.append((m.pow(2) * f.s).sum((1, 2)))
    return torch.cat(out)


def _layer_block(f: Factored, params: dict[str, Tensor], with_bias: bool) -> Tensor:
    """[W.reshape(o, -1) | b] float64 (o, i'); the bias column 0 unless ``with_bias``."""
    w = params[f.weight].detach().double().reshape(f.shape[0], -1)
    if f.bias is None:
        return w
    b = params[f.bias].detach().double() if with_bias else torch.zeros(f.shape[0]).to(w)
    return torch.cat([w, b[:, None]], dim=1)


def _factored_quadratic(f: Factored, mine: list[Member], params, size: int) -> Tensor:
    """theta_g^T F_gg theta_g on one factored layer for every unit (no 1/2)."""
    rows = [m for m in mine if m.role == "out" and m.param == f.weight]
    cols = [m for m in mine if m.role == "in" and m.param == f.weight]
    bias = any(m.param == f.bias for m in mine)
    if cols and (rows or bias) or any(m.dim != (0 if m.role == "out" else 1) for m in mine):
        raise ModelError(
            f"layer {f.weight!r}: a unit both produced and read by it, or a member on "
            "another dimension, has no factored group quadratic"
        )
    block = _layer_block(f, params, bias)
    dev = block.device
    if not cols:  # producing rows (with the bias column when the bias is a member)
        if not rows:  # a bias-only member: its column alone, rows = its entries
            rows = [m for m in mine if m.param == f.bias]
        idx = torch.cat([unit_index(m, size) for m in rows], dim=1).to(dev)
        if not f.ekfac:
            return _sum_blocks(f.G * (block @ f.A @ block.T), idx)
        return _ekfac_rows(f, block, idx)
    k = f.kernel
    chans = torch.cat([unit_index(m, size) for m in cols], dim=1)
    idx = (chans[:, :, None] * k + torch.arange(k)).reshape(size, -1).to(dev)
    if not f.ekfac:
        return _sum_blocks((block.T @ f.G @ block) * f.A, idx)
    return _ekfac_cols(f, block, idx)


def quadratic_terms(
    groups: list[UnitGroup],
    params: dict[str, Tensor],
    factored: dict[str, Factored],
    diag: dict[str, Tensor],
) -> dict[str, Tensor]:
    """theta_g^T F_gg theta_g per unit (group -> (size,) float64, no 1/2; module docstring).

    factored: ``factored_layers`` of the curvature; diag: the diagonal Fisher of every
    member parameter that is not a factored layer's weight or bias (ModelError if missing).
    """
    by_param = {}
    for f in factored.values():
        by_param[f.weight] = f
        if f.bias is not None:
            by_param[f.bias] = f
    out = {}
    for g in groups:
        total = torch.zeros(g.size, dtype=torch.float64)
        layers: dict[str, list[Member]] = {}
        for m in g.members:
            if m.param in by_param:
                layers.setdefault(by_param[m.param].weight, []).append(m)
                continue
            if m.param not in diag:
                raise ModelError(f"no curvature for {m.param!r} (unit group {g.name!r})")
            d = member_values(m, g.size, diag[m.param])
            total += (d * member_values(m, g.size, params[m.param]).pow(2)).sum(1).cpu()
        for w, mine in layers.items():
            total += _factored_quadratic(factored[w], mine, params, g.size).cpu()
        out[g.name] = total
    return out


def sq_norms(groups: list[UnitGroup], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """||theta_g||^2 per unit (group -> (size,) float64)."""
    return {n: s.pow(2) for n, s in magnitude_scores(groups, params).items()}


def group_scores(
    criterion: str,
    groups: list[UnitGroup],
    params: dict[str, Tensor],
    *,
    grads: dict[str, Tensor] | None = None,
    factored: dict[str, Factored] | None = None,
    diag: dict[str, Tensor] | None = None,
    lam: float = 0.0,
    normalize: bool = False,
    obs_damping: float = 1e-3,
) -> dict[str, Tensor]:
    """Scores per unit (group name -> (size,) float64, higher = keep) of ``criterion``
    (GROUP_CRITERIA; module docstring). grads: mean loss gradients (lm, qm); factored, diag:
    the curvature (qm, obd, obs); lam: locality penalty (loss units per squared weight);
    normalize: magnitude only; obs_damping: relative damping of A' (obs)."""
    if criterion not in GROUP_CRITERIA:
        raise choice_error("group criterion", criterion, GROUP_CRITERIA)
    if criterion == "magnitude":
        return magnitude_scores(groups, params, normalize)
    if criterion == "lm":
        if grads is None:
            raise SettingError("the 'lm' group criterion needs the mean gradients")
        return {n: t.pow(2) for n, t in taylor_terms(groups, params, grads).items()}
    if factored is None or diag is None:
        raise SettingError(f"the {criterion!r} group criterion needs the curvature")
    if criterion == "obs":
        quad = obs_quadratic_terms(groups, params, factored, diag, obs_damping)
    else:
        quad = quadratic_terms(groups, params, factored, diag)
    sq = sq_norms(groups, params) if lam else {}
    out = {}
    for g in groups:
        change = 0.5 * quad[g.name]
        if criterion == "qm":
            if grads is None:
                raise SettingError("the 'qm' group criterion needs the mean gradients")
            change = (change - taylor_terms([g], params, grads)[g.name].cpu()).abs()
        out[g.name] = change + (0.5 * lam * sq[g.name].cpu() if lam else 0.0)
    return out


def _alive_columns(f: Factored, block: Tensor) -> Tensor:
    """Columns of the block still in use (not entirely zero; the bias column always):
    removed units' columns are zero, and must neither absorb a compensation nor count in
    the inverse."""
    alive = block.ne(0).any(0)
    if f.bias is not None:
        alive[-1] = True
    return alive


def _damped_inverse(a: Tensor, damping: float) -> Tensor:
    """(A + lam I)^-1, lam = damping * mean(diag A) + 1e-12 (relative, as unstructured OBS)."""
    lam = damping * float(a.diagonal().mean()) + 1e-12
    return torch.linalg.inv(a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))


def _column_index(m: Member, size: int, kernel: int) -> Tensor:
    """(size, w * kernel) block columns of every unit of a consumer member."""
    chans = unit_index(m, size)
    return (chans[:, :, None] * kernel + torch.arange(kernel)).reshape(size, -1)


def obs_quadratic_terms(groups, params, factored, diag, damping: float) -> dict[str, Tensor]:
    """Like ``quadratic_terms``, but a consumer's columns J of a factored layer count with
    the structured OBS saliency tr(W_J^T G W_J [(A_KK + lam)^-1_JJ]^-1), K = the layer's
    columns still alive (bias column included): the loss left after those columns absorb
    the removal (``obs_column_update``). A unit already removed keeps its plain term."""
    plain = quadratic_terms(groups, params, factored, diag)
    out = {}
    for g in groups:
        total = plain[g.name].clone()
        for m in g.members:
            f = factored.get(m.param)
            if f is None or m.role != "in":
                continue
            block = _layer_block(f, params, True)
            alive = _alive_columns(f, block)
            pos = torch.cumsum(alive.long(), 0) - 1  # block column -> index among alive ones
            inv = _damped_inverse(f.A[alive][:, alive], damping)
            wgw = (block.T @ f.G @ block)[alive][:, alive]
            idx = _column_index(m, g.size, f.kernel).to(block.device)
            before = _factored_quadratic(f, [m], params, g.size)
            for u in range(g.size):
                if not bool(alive[idx[u]].all()):
                    continue
                j = pos[idx[u]]
                saliency = (wgw[j][:, j] * torch.linalg.inv(inv[j][:, j])).sum()
                total[u] += float(saliency - before[u])
        out[g.name] = total
    return out


def obs_column_update(
    f: Factored, params: dict[str, Tensor], removed: Tensor, damping: float = 1e-3
) -> dict[str, Tensor]:
    """The OBS update of a consumer layer whose block columns ``removed`` (int64) go:
    delta = -W_R [(A_KK + lam)^-1_RR]^-1 (A_KK + lam)^-1_R,: on the alive columns K, all
    removed columns at once (jointly exact under F = G (x) A). Returns {weight: delta
    weight-shaped, bias: delta (o,)} in the parameters' dtype; the removed columns' own
    entries become -W_R (zero after adding)."""
    block = _layer_block(f, params, True)
    alive = _alive_columns(f, block)
    alive[removed] = True
    cols = torch.nonzero(alive).flatten()
    pos = torch.cumsum(alive.long(), 0) - 1
    inv = _damped_inverse(f.A[cols][:, cols], damping)
    r = pos[removed.to(pos.device)]
    delta_k = -block[:, removed] @ torch.linalg.solve(inv[r][:, r], inv[r])
    delta = torch.zeros_like(block)
    delta[:, cols] = delta_k
    w = params[f.weight]
    out = {f.weight: delta[:, : delta.shape[1] - (f.bias is not None)].reshape(w.shape).to(w)}
    if f.bias is not None:
        out[f.bias] = delta[:, -1].to(params[f.bias])
    return out
