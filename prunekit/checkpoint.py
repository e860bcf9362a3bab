"""Load and save models: state dicts (.pt/.pth/.safetensors) with an arch spec, TorchScript
archives, and full pickled modules only when the user trusts them.

Arch spec: ``module:factory`` with optional keyword arguments,
``prunekit.models:mlp?sizes=784,300,100,10&act=tanh``. prunekit's own safetensors store
the spec in their metadata under ``prunekit.arch``.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from prunekit.errors import CheckpointError, first_line
from prunekit.trust import check_file_spec

ARCH_KEY = "prunekit.arch"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "weights")


@dataclass
class LoadedModel:
    """A loaded model and where it came from.

    arch: the arch spec used (None for TorchScript/pickled modules); fmt: 'safetensors',
    'state_dict', 'torchscript' or 'pickle'; metadata: safetensors metadata, if any.
    """

    model: nn.Module
    arch: str | None
    fmt: str
    metadata: dict[str, str] = field(default_factory=dict)


def _parse_value(text: str):
    if "," in text:
        return [_parse_value(t) for t in text.split(",") if t]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_arch(spec: str) -> tuple[str, str, dict]:
    """(module, factory, kwargs) of an arch spec ``module:factory?key=value&...``.

    Values become int, float, bool or lists of those (comma-separated) where they parse.
    """
    base, _, query = spec.partition("?")
    module, sep, factory = base.partition(":")
    if not sep or not module or not factory:
        raise CheckpointError(
            f"arch spec {spec!r} must look like module:factory[?key=value&...], "
            "e.g. prunekit.models:mlp?sizes=784,300,100,10&act=tanh"
        )
    kwargs = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise CheckpointError(f"arch spec {spec!r}: argument {part!r} must be key=value")
        kwargs[key] = _parse_value(value)
    return module, factory, kwargs


def build_model(spec: str) -> nn.Module:
    """Instantiate the model an arch spec names; CheckpointError if it doesn't import or build."""
    module_name, factory_name, kwargs = parse_arch(spec)
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"arch spec {spec!r} does not import: {first_line(exc)}; expected module:factory"
        ) from exc
    try:
        model = factory(**kwargs)
    except Exception as exc:  # a user factory may raise anything on bad arguments
        raise CheckpointError(f"arch spec {spec!r} failed to build: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"arch spec {spec!r} returned {type(model).__name__}, not a Module")
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as safetensors: {first_line(exc)}"
        ) from exc
    return tensors, metadata


_PICKLED_OBJECTS = ("safe_globals", "Unsupported global", "unsupported GLOBAL", "is blocked")


def _refuse_pickle(path: Path, exc: Exception) -> CheckpointError:
    """Why a weights-only load failed, as one line: corrupt, or objects that could run code."""
    text = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if any(marker in text for marker in _PICKLED_OBJECTS):
        what = f" (it names {named.group(1)})" if named else ""
        return CheckpointError(
            f"{str(path)!r} holds pickled Python objects{what}, which can run code when loaded; "
            "pass --trust-pickle only if you trust its source, or save a state_dict and give --arch"
        )
    if "Unsupported operand" in text:
        return CheckpointError(
            f"{str(path)!r} is a plain Python pickle, not a PyTorch checkpoint; loading it can run "
            "code: pass --trust-pickle only if you trust its source"
        )
    return CheckpointError(
        f"cannot read {str(path)!r}: not a PyTorch checkpoint, or corrupt "
        "(unpickling failed); expected .pt/.pth, .safetensors or TorchScript"
    )


def _read_pickle(path: Path, trust_pickle: bool):
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = _refuse_pickle(path, exc)
        if not trust_pickle or "--trust-pickle" not in str(refusal):
            raise refusal from exc
    except Exception as exc:  # torch.load raises RuntimeError/EOFError/... on corrupt files
        raise CheckpointError(
            f"cannot read {str(path)!r}: file is corrupt ({first_line(exc)})"
        ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary unpickling failures
        raise CheckpointError(f"cannot unpickle {str(path)!r}: {first_line(exc)}") from exc


def _unwrap_state_dict(obj) -> dict:
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "checkpoint is neither a state_dict (name -> tensor) nor a module; "
            f"found {type(obj).__name__}"
        )
    return obj


def fit_state_dict(model: nn.Module, state: dict, spec: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly; CheckpointError listing every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"state_dict does not fit arch {spec!r}: missing keys {missing[:8]}, unexpected "
            f"keys {unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(state, strict=True)
    return model


def load_model(
    path: Path | str, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load a model file in any supported form (see module docstring); eval mode, CPU.

    Raises CheckpointError for a missing, unreadable or corrupt file, a pickle without
    ``trust_pickle``, a missing or broken arch spec, or a state_dict that doesn't fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        spec = arch or metadata.get(ARCH_KEY)
        if not arch and spec:
            check_file_spec("arch", spec, f"the metadata of {str(path)!r}")
        fmt = "safetensors"
    elif _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # jit raises RuntimeError subclasses on bad archives
            raise CheckpointError(
                f"cannot read TorchScript archive {str(path)!r}: {first_line(exc)}"
            ) from exc
        check_finite(dict(model.state_dict()), path)
        return LoadedModel(model.eval(), None, "torchscript")
    else:
        obj = _read_pickle(path, trust_pickle)
        if isinstance(obj, nn.Module):
            check_finite(dict(obj.state_dict()), path)
            return LoadedModel(obj.eval(), arch, "pickle")
        state, metadata, spec, fmt = _unwrap_state_dict(obj), {}, arch, "state_dict"
    if not spec:
        raise CheckpointError(
            f"{str(path)!r} holds weights only; give --arch module:factory "
            "(e.g. prunekit.models:mlp?sizes=784,300,100,10&act=tanh)"
        )
    check_finite(state, path)
    model = fit_state_dict(build_model(spec), state, spec)
    return LoadedModel(model.eval(), spec, fmt, metadata)


def check_finite(state: dict, path: Path) -> None:
    """CheckpointError naming the first tensor of ``state`` holding NaN or +-Inf.

    Scores, curvature and fine-tuning of a model with non-finite weights are all NaN, so
    such a file is refused at load time instead of producing a run whose loss is nan.
    """
    for name, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} holds {int(bad.sum())} non-finite values "
                f"(NaN or Inf) of {tensor.numel()}; weights must be finite numbers"
            )
