"""Resume: checkpoint a run after every finished step, and continue from the latest one.

A step's state is everything the next step reads: weights, masks, both random generators,
the kept EKFAC eigenbasis, the metrics rows and NTK records so far. Restored, the run ends
bit-identical (CPU) to an uninterrupted one. The files live under ``prune.state.STATE_DIR``
of the run directory, beside the cached teacher outputs of a distillation run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunekit.criteria.ekfac import EKFACBasis
from prunekit.criteria.kfac import Layer
from prunekit.distill import TEACHER_FILE
from prunekit.errors import RunDirError, SettingError
from prunekit.prune.state import STATE_DIR, check_step_state, load_step_state, save_step_state

if TYPE_CHECKING:
    from prunekit.loop import _Run


def resume_plan(state_dir, resume: bool) -> tuple[Path | None, bool]:
    """(teacher cache file or None, whether a checkpoint will be resumed) for a run that
    checkpoints into ``state_dir`` (None: no checkpoints, no cache)."""
    if state_dir is None:
        return None, False
    cache = Path(state_dir) / STATE_DIR / TEACHER_FILE
    return cache, resume and has_checkpoint(state_dir)


def _cache_tensors(cache: dict) -> tuple[dict, dict]:
    """EKFAC cache (kept eigenbasis) as flat tensors plus JSON-able metadata."""
    basis = cache.get("ekfac_basis")
    meta: dict = {"ekfac_step": cache.get("ekfac_step"), "ekfac_kept": cache.get("ekfac_kept")}
    tensors: dict = {}
    if basis is None:
        return tensors, meta
    meta["layers"] = {n: dataclasses.asdict(layer) for n, layer in basis.layers.items()}
    for f in dataclasses.fields(basis):
        if f.name != "layers":
            for name, t in getattr(basis, f.name).items():
                tensors[f"cache/{f.name}/{name}"] = t
    return tensors, meta


def _restore_cache(tensors: dict, meta: dict, source: Path) -> dict:
    if "layers" not in meta:
        return {}
    step, kept = meta.get("ekfac_step"), meta.get("ekfac_kept", 1.0)
    step_ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    kept_ok = isinstance(kept, (int, float)) and not isinstance(kept, bool) and 0 <= kept <= 1
    if not (step_ok and kept_ok):
        raise RunDirError(
            f"{source}: cache ekfac_step {step!r} / ekfac_kept {kept!r} must be an integer "
            ">= 0 and a fraction in [0, 1]; the checkpoint is damaged: start the run afresh "
            "(without --resume) in a new --out directory"
        )
    fields = {f.name: {} for f in dataclasses.fields(EKFACBasis) if f.name != "layers"}
    for key, t in tensors.items():
        if key.startswith("cache/"):
            _, fname, name = key.split("/", 2)
            fields[fname][name] = t
    layers = {n: Layer(**{**d, "shape": tuple(d["shape"])}) for n, d in meta["layers"].items()}
    basis = EKFACBasis(layers=layers, **fields)
    return {"ekfac_basis": basis, "ekfac_step": step, "ekfac_kept": float(kept)}


def save_state(run: _Run, state_dir, step: int, state_info: dict | None) -> None:
    """Checkpoint everything needed to continue bit-identically after ``step``."""
    cache_tensors, cache_meta = _cache_tensors(run.cache)
    tensors = {f"model/{k}": v for k, v in run.model.state_dict().items()}
    tensors.update({f"mask/{k}": m.to(torch.uint8) for k, m in run.masks.items()})
    tensors["rng/generator"] = run.gen.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors.update(cache_tensors)
    info = {
        **(state_info or {}),
        "rows": run.rows,
        "dense": run.dense,
        "pruned": run.pruned,
        "estimators": run.estimators,
        "cache": cache_meta,
        "ntk": run.ntk.records if run.ntk is not None else [],
    }
    save_step_state(state_dir, step, tensors, info)


_NONE = type(None)
#: latest.json keys a step checkpoint holds (values are untrusted: types checked on load)
STATE_INFO = {
    "rows": list,
    "dense": (dict, _NONE),
    "pruned": (dict, _NONE),
    "estimators": dict,
    "cache": dict,
    "ntk": list,
}
STATE_INFO_OPTIONAL = {"recipe_hash": str, "recipe": dict}


def expected_state_tensors(run: _Run) -> dict:
    """Tensor name -> shape (None = any) that a checkpoint of ``run`` must hold."""
    expected = {f"model/{k}": tuple(v.shape) for k, v in run.model.state_dict().items()}
    expected |= {f"mask/{n}": tuple(m.shape) for n, m in run.masks.items()}
    return expected | {"rng/generator": None, "rng/torch": None}


def has_checkpoint(run_dir) -> bool:
    """True when ``run_dir`` holds a step checkpoint (validated: RunDirError if corrupt)."""
    return check_step_state(run_dir, STATE_INFO, STATE_INFO_OPTIONAL) is not None


def restore_state(run: _Run, state_dir, state_info: dict | None) -> int:
    """Load the latest checkpoint into ``run``; returns its step (0 when there is none).

    The checkpoint is untrusted input: its JSON keys and types, file paths, header, tensor
    names and shapes are checked first (RunDirError naming the file), and one made with
    another recipe is refused (naming the changed keys).
    """
    loaded = None
    if state_dir is not None:
        loaded = load_step_state(
            state_dir,
            required=STATE_INFO,
            optional=STATE_INFO_OPTIONAL,
            expected=expected_state_tensors(run),
            optional_prefixes=("cache/",),
        )
    if loaded is None:
        return 0
    tensors, info = loaded
    _check_same_recipe(info, state_info or {}, Path(state_dir) / STATE_DIR / "latest.json")
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    device = next(run.model.parameters()).device
    run.masks = {n: tensors[f"mask/{n}"].bool().to(device) for n in run.masks}
    run.gen.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    run.cache = _restore_cache(tensors, info["cache"], Path(state_dir) / STATE_DIR / "latest.json")
    run.rows, run.dense, run.pruned = info["rows"], info["dense"], info["pruned"]
    run.estimators = info["estimators"]
    if run.ntk is not None:
        run.ntk.records = info["ntk"]
    return int(info["step"])


def _check_same_recipe(info: dict, state_info: dict, latest: Path) -> None:
    if info.get("recipe_hash") == state_info.get("recipe_hash"):
        return
    # Imported here: the recipe schema (and yaml) is needed only to explain a refusal.
    from prunekit.recipe import changed_keys

    changed = changed_keys(info.get("recipe") or {}, state_info.get("recipe") or {})
    raise SettingError(
        f"cannot resume from {str(latest)!r}: the recipe changed since that checkpoint (keys "
        f"{changed or ['?']}); restore it or start a new run without --resume"
    )
