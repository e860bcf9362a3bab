"""Fine-tuning between pruning steps and evaluation (prunekit.finetune)."""

from prunekit.finetune.guard import KEPT, PhaseGuard, checkpoint_iterations
from prunekit.finetune.loop import (
    LR_SCHEDULES,
    OPTIMIZERS,
    FinetuneSettings,
    evaluate,
    finetune,
    make_optimizer,
)
from prunekit.finetune.lrprobe import (
    AUTO,
    LR_CANDIDATES,
    PROBE_STEPS,
    PROBE_TOLERANCE,
    choose_lr,
    lr_setting,
    probe_lr,
)

__all__ = [
    "AUTO",
    "KEPT",
    "LR_CANDIDATES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PROBE_STEPS",
    "PROBE_TOLERANCE",
    "FinetuneSettings",
    "PhaseGuard",
    "checkpoint_iterations",
    "choose_lr",
    "evaluate",
    "finetune",
    "lr_setting",
    "make_optimizer",
    "probe_lr",
]
