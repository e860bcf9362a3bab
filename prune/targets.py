"""Prunable tensors: weights of Linear, Conv and recurrent layers (never biases or norms).

Recurrent: nn.LSTM/GRU/RNN and their single-step cells nn.LSTMCell/GRUCell/RNNCell (a
model that loops a cell over time), ``weight_ih*`` and ``weight_hh*``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from prunekit.errors import ModelError
from prunekit.types import Target

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _type_name(module: nn.Module) -> str:
    # Children of a loaded TorchScript archive are RecursiveScriptModules: their class is
    # lost, but original_name keeps it.
    return getattr(module, "original_name", None) or type(module).__name__


def _is(module: nn.Module, classes: tuple[type, ...]) -> bool:
    return isinstance(module, classes) or _type_name(module) in {c.__name__ for c in classes}


def _kind_of(module: nn.Module, param: str, embeddings: bool) -> str | None:
    if _is(module, (nn.Linear,)) and param == "weight":
        return "linear"
    if _is(module, _CONV) and param == "weight":
        return "conv"
    if _is(module, _RECURRENT) and param.startswith(("weight_ih", "weight_hh")):
        return "recurrent"
    if embeddings and _is(module, (nn.Embedding,)) and param == "weight":
        return "embedding"
    custom = getattr(module, "prunable_parameters", None)
    if callable(custom) and param in custom():
        return "recurrent" if getattr(module, "is_recurrent", False) else "other"
    return None


_MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _attention_kinds(model: nn.Module) -> dict[str, str]:
    """nn.MultiheadAttention's projections (full parameter names) -> kind 'other'.

    It calls its packed in-projection and its out_proj's weight functionally, so no module
    hook ever sees them: they are targets with the exact (diagonal) curvature path.
    """
    kinds = {}
    for name, module in model.named_modules():
        if not _is(module, (nn.MultiheadAttention,)):
            continue
        prefix = f"{name}." if name else ""
        for p_name, p in module.named_parameters(recurse=False):
            if p_name in _MHA_PROJECTIONS and p is not None:
                kinds[prefix + p_name] = "other"
        kinds[f"{prefix}out_proj.weight"] = "other"
    return kinds


def find_targets(
    model: nn.Module,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    embeddings: bool = False,
) -> dict[str, Target]:
    """Prunable tensors of ``model`` keyed by parameter name, in ``named_parameters`` order.

    include/exclude: fnmatch patterns on parameter names (include empty = all default
    targets). embeddings: also prune nn.Embedding weights. nn.MultiheadAttention's in- and
    out-projections are targets of kind 'other' (its forward bypasses module hooks). Modules
    may opt in other parameters through a ``prunable_parameters()`` method returning local
    names.
    Raises ModelError when nothing is left to prune.
    """
    found: dict[str, Target] = {}
    attention = _attention_kinds(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            kind = attention.get(full) or _kind_of(module, p_name, embeddings)
            if kind is not None and canonical.get(id(p), full) != full:
                # a tied weight (e.g. an LM head sharing the embedding): one tensor, keyed by
                # its named_parameters name, on the exact path (no single module sees it all)
                full, kind = canonical[id(p)], "other"
                if full in found:
                    continue
            if kind is None:
                continue
            if include and not any(fnmatchcase(full, pat) for pat in include):
                continue
            if any(fnmatchcase(full, pat) for pat in exclude):
                continue
            found[full] = Target(full, mod_name, tuple(p.shape), kind)
    if not found:
        raise ModelError(
            "the model has no prunable weights (weights of Linear, Conv1d/2d/3d, LSTM/GRU/RNN "
            "and their cells"
            f"{', Embedding' if embeddings else ''}) after include={list(include)} "
            f"exclude={list(exclude)}"
        )
    order = [n for n, _ in model.named_parameters()]
    return {n: found[n] for n in order if n in found}
