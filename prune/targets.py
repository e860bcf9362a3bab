"""Prunable tensors: weights of Linear, Conv and recurrent layers (never biases or norms)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from prunekit.errors import ModelError
from prunekit.types import Target

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
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


def find_targets(
    model: nn.Module,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    embeddings: bool = False,
) -> dict[str, Target]:
    """Prunable tensors of ``model`` keyed by parameter name, in ``named_parameters`` order.

    include/exclude: fnmatch patterns on parameter names (include empty = all default
    targets). embeddings: also prune nn.Embedding weights. Modules may opt in other
    parameters through a ``prunable_parameters()`` method returning local names.
    Raises ModelError when nothing is left to prune.
    """
    found: dict[str, Target] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            kind = _kind_of(module, p_name, embeddings)
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if kind is None:
                continue
            if include and not any(fnmatchcase(full, pat) for pat in include):
                continue
            if any(fnmatchcase(full, pat) for pat in exclude):
                continue
            found[full] = Target(full, mod_name, tuple(p.shape), kind)
    if not found:
        raise ModelError(
            "the model has no prunable weights (weights of Linear, Conv1d/2d/3d, LSTM/GRU/RNN"
            f"{', Embedding' if embeddings else ''}) after include={list(include)} "
            f"exclude={list(exclude)}"
        )
    order = [n for n, _ in model.named_parameters()]
    return {n: found[n] for n in order if n in found}
