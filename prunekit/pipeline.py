"""Compatibility names: the wiring layer that was this one module, split by concern.

Everything ``prunekit.pipeline`` defined publicly is still importable from here; new code
imports from the module that owns it (see ARCHITECTURE.md): settings, distill, preflight,
ntklog, ranks, loop, resume, report, api, recipe_run. This module defines nothing.
"""

from prunekit.api import (
    export_model,
    export_onnx,
    fisher_diagonal,
    ntk_alignment,
    prune,
    resolve_data,
    score,
    train_example,
)
from prunekit.distill import TEACHER_FILE, prepare_task, teacher_outputs
from prunekit.loop import run_pruning
from prunekit.ntklog import NTK_MAX_OUTPUTS, NTK_MAX_WEIGHTS, NtkLog, ntk_is_cheap
from prunekit.preflight import validate
from prunekit.ranks import RankSlice, rank_and_world, score_batches_of
from prunekit.recipe_run import (
    explain_recipe,
    load_checked_recipe,
    recipe_choices,
    recipe_model,
    run_recipe,
    settings_from_recipe,
    validate_recipe,
)
from prunekit.report import STEP_KEYS, build_report, write_run
from prunekit.resume import restore_state, save_state
from prunekit.settings import (
    DEVICES,
    Progress,
    PruneResult,
    PruneSettings,
    make_run_criterion,
    resolve_device,
    resolved_labels,
)

__all__ = [
    "DEVICES",
    "NTK_MAX_OUTPUTS",
    "NTK_MAX_WEIGHTS",
    "STEP_KEYS",
    "TEACHER_FILE",
    "NtkLog",
    "Progress",
    "PruneResult",
    "PruneSettings",
    "RankSlice",
    "build_report",
    "explain_recipe",
    "export_model",
    "export_onnx",
    "fisher_diagonal",
    "load_checked_recipe",
    "make_run_criterion",
    "ntk_alignment",
    "ntk_is_cheap",
    "prepare_task",
    "prune",
    "rank_and_world",
    "recipe_choices",
    "recipe_model",
    "resolve_data",
    "resolve_device",
    "resolved_labels",
    "restore_state",
    "run_pruning",
    "run_recipe",
    "save_state",
    "score",
    "score_batches_of",
    "settings_from_recipe",
    "teacher_outputs",
    "train_example",
    "validate",
    "validate_recipe",
    "write_run",
]
