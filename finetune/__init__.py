"""Fine-tuning between pruning steps and evaluation (prunekit.finetune)."""

from prunekit.finetune.loop import (
    LR_SCHEDULES,
    OPTIMIZERS,
    FinetuneSettings,
    evaluate,
    finetune,
    make_optimizer,
)

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "FinetuneSettings",
    "evaluate",
    "finetune",
    "make_optimizer",
]
