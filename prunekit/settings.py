"""What a pruning run is asked to do and what it returns: PruneSettings, PruneResult.

Also the two objects settings name directly: the torch device and the criterion (found by
name in the criteria registry, with the run's overrides).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.criteria import CRITERIA, make_criterion
from prunekit.errors import SettingError, choice_error
from prunekit.finetune import AUTO, LR_CANDIDATES, FinetuneSettings, lr_setting
from prunekit.types import Masks, Task

# progress(label, done, total): the CLI draws bars from these calls; None = silent.
Progress = Callable[[str, int, int], None]
DEVICES = ("cpu", "cuda", "auto")
UPDATES = ("auto", "none", "summed", "joint", "rows")
DAMPED_UPDATES = ("joint", "rows")  # updates whose damping is chosen on held-out examples
REFIT_BELOW_DEFAULT = 0.5  # EKFAC basis refit when half the weights kept at the last fit are gone
ONE_SHOT_ESTIMATES = 10  # curvature fits a run without fine-tuning gets at least (auto shots)
STRUCTURES = ("unstructured", "units")
AUTO_CRITERION = "auto"  # the default: obs + rows or obd, by the run (``criterion_name``)
# 'auto' ranks with obs and applies the rows update up to this target in fine-tuning runs,
# obd without an update above it: measured on a test half the run never saw (BENCHMARKS.md
# `default_*`), obs + rows is ahead at 90%, level or ahead at 95%, 0.3-1.3 points behind at
# 98.85% on the MNIST MLPs.
AUTO_OBS_UP_TO = 0.95


@dataclass(frozen=True)
class PruneSettings:
    """Everything one pruning run needs besides the model and data.

    criterion: a name in the criteria registry, or 'auto' (the default; see
    ``criterion_name``: obs with the rows update up to 95% in a fine-tuning run, else obd);
    sparsity: final fraction of target weights pruned, in [0, 1); steps: pruning steps on
    the ``schedule`` ('exp', 'linear', 'cubic'); fisher/labels: curvature estimator and
    Fisher labels (None = the criterion's default); samples: labels drawn per example for
    'sampled'; lam: locality penalty; scope: 'global' or 'layer'; score_examples: training
    examples used to score (first N, fixed); score_batch_size: examples per scoring batch
    (memory: curvature passes hold every target layer's inputs and outputs for a batch);
    finetune_epochs: fine-tuning after each step (0 = the paper's mode: all steps first);
    final_epochs: the last fine-tune; batch_size, optimizer, momentum, weight_decay:
    fine-tuning; lr: the fine-tuning rate, a number > 0 or 'auto' (probe LR_CANDIDATES for
    a few steps at the first phase, keep the largest rate within 1% of the lowest validation
    loss, reuse it; see finetune/lrprobe.py);
    finetune_checkpoints: validation evaluations per fine-tuning phase, the end included
    (each phase hands back its weights with the lowest validation loss, the start's
    included, so it never makes the model worse on validation); include/exclude: target
    name patterns; seed: every random choice; device: 'cpu', 'cuda' or 'auto'; ntk: log
    the tangent-kernel alignment (None = off: the log can cost several times the run, see
    ntklog.py); ntk_every: fine-tuning iterations to log at ('xM' log-spaced by factor M,
    'N' every N); probe_train/probe_val: examples in the fixed NTK probes;
    refit_basis_every: EKFAC eigenbasis refit period in steps (0 = keep the first basis,
    refit only the scaling); refit_basis_below: also refit it once the kept fraction of
    target weights has fallen to this fraction of its value at the last fit (0 = off; the
    default 0.5 refits at steps 1, 5 and 9 of the 10-step schedule to 90%); compensate:
    apply the OBS update to surviving weights within
    each step (kfac/ekfac); masked_scaling: refit EKFAC's scaling from masked per-example
    gradients (pruned weights contribute nothing; exact, but its cost grows with
    out*in*(out+in) per example, ~100x the unmasked refit on a 784x300 layer). Off by
    default: the diagonal entries of surviving weights estimate the same F_qq either way,
    since the diagonal of a principal submatrix is the diagonal itself; recalibrate_bn: re-
    estimate BatchNorm running statistics (per time step for BN-LSTM) on training batches
    right after each pruning step (None = on when the model has BatchNorm); loss: 'auto'
    (from the data's labels), 'classification', 'regression' or 'distill' (targets = the
    dense model's outputs); distill_metric: 'auto' (kl for logits over the data's classes, else
    cosine), 'kl', 'mse' or 'cosine'; temperature: the KL temperature; task_spec:
    'module:factory' of a user task (its forward runs the model; its loss trains unless loss
    is 'distill'); embeddings: also prune nn.Embedding weights (diagonal Fisher);
    lr_schedule: 'constant' or 'cosine' within every fine-tuning phase (each phase restarts
    at the rate and decays to 0: warm restarts); distill_weight: w in [0, 1], fine-tuning
    loss (1 - w) * task loss + w * distillation to the dense model's outputs (kl at
    ``temperature`` for logits; 0 = off; ``loss='distill'`` is w = 1 without labels);
    shots: curvature re-estimations per pruning step, the step's weights removed in that
    many equal slices (0 = auto, see ``shot_count``); update: what the surviving weights
    of a factored layer get when weights are removed: 'auto' (``auto_update``: 'rows' for
    the 'auto' criterion's obs and for a run without any fine-tuning, else 'none'),
    'none', 'summed' (single-weight OBS updates added up = the old ``compensate``),
    'joint' (the exact OBS update for all removed weights at once, correlations included)
    or 'rows' (the same per output row against the layer's input factor A only, the
    OBC/SparseGPT form; cheap); joint and rows choose their damping per layer on
    validation examples (never trained on; ``obsupdate.held_out_batches``);
    structure: 'unstructured' (single weights) or 'units' (whole neurons, channels, hidden
    units, heads: ``sparsity`` is then the fraction of units removed).
    """

    criterion: str = AUTO_CRITERION
    sparsity: float = 0.9
    steps: int = 10
    schedule: str = "exp"
    fisher: str | None = None
    labels: str | None = None
    samples: int = 1
    lam: float = 0.0
    scope: str = "global"
    score_examples: int = 1000
    score_batch_size: int = 250
    finetune_epochs: float = 1.0
    final_epochs: float = 2.0
    batch_size: int = 100
    optimizer: str = "sgd"
    lr: float | str = "auto"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    refit_basis_every: int = 0
    refit_basis_below: float = REFIT_BELOW_DEFAULT
    masked_scaling: bool = False
    compensate: bool = False
    recalibrate_bn: bool | None = None
    ntk: bool | None = None
    ntk_every: str = "none"
    probe_train: int = 100
    probe_val: int = 100
    loss: str = "auto"
    distill_metric: str = "auto"
    temperature: float = 1.0
    task_spec: str | None = None
    embeddings: bool = False
    finetune_checkpoints: int = 1
    lr_schedule: str = "constant"
    distill_weight: float = 0.0
    shots: int = 0
    update: str = "auto"
    structure: str = "unstructured"

    @property
    def criterion_name(self) -> str:
        """The criterion in force: ``criterion``, or for 'auto' 'obs' in a run that fine-tunes,
        prunes single weights and targets at most AUTO_OBS_UP_TO sparsity, else 'obd'. The
        'auto' obs comes with the rows update (``auto_update``): OBS ranks a weight by the
        loss left after its neighbours are updated, so the pair belongs together."""
        if self.criterion != AUTO_CRITERION:
            return self.criterion
        return "obs" if self._auto_obs() else "obd"

    def _auto_obs(self) -> bool:
        """True when ``criterion='auto'`` resolves to obs + rows (see ``criterion_name``)."""
        # unchecked values (preflight refuses them later): not numbers count as 0 / 1
        epochs = [e for e in (self.finetune_epochs, self.final_epochs) if _is_number(e)]
        fine_tunes = any(e > 0 for e in epochs)
        target = self.sparsity if _is_number(self.sparsity) else 1.0
        return (
            self.criterion == AUTO_CRITERION
            and fine_tunes
            and self.structure == "unstructured"
            and target <= AUTO_OBS_UP_TO
        )

    @property
    def update_mode(self) -> str:
        """The OBS update in force: 'summed' for the legacy ``compensate``; for 'auto' see
        ``auto_update``; else ``update``."""
        if self.compensate and self.update in ("none", "auto"):
            return "summed"
        return self.auto_update() if self.update == "auto" else self.update

    @property
    def shot_count(self) -> int:
        """Curvature re-estimations per step in force: ``shots``, or for 0 (auto) 1, except
        in a run that applies the rows update and fine-tunes nowhere: ceil(10 / steps), so
        that the run re-estimates at least 10 times in all. Measured (BENCHMARKS.md
        `oneshot`, 784-40-20-10 MLP, 95%, no fine-tuning): one step 81.6% with 1 shot,
        88.8% with 10; 10 steps of 1 shot 90.5%; magnitude 83.5%."""
        if self.shots > 0:
            return self.shots
        one_shot = self.finetune_epochs <= 0 and self.final_epochs <= 0
        steps = self.steps if isinstance(self.steps, int) and self.steps >= 1 else 1  # unchecked
        if one_shot and self.update_mode == "rows" and steps < ONE_SHOT_ESTIMATES:
            return -(-ONE_SHOT_ESTIMATES // steps)
        return 1

    def auto_update(self) -> str:
        """What ``update='auto'`` means for these settings: 'rows' when the criterion is
        'auto' and resolves to obs (``criterion_name``), or when the run fine-tunes nowhere
        (finetune_epochs = final_epochs = 0) and prunes single weights; in both cases only
        for a criterion that ranks on a KFAC/EKFAC curvature without reconstructing. 'none'
        otherwise. Measured (BENCHMARKS.md `oneshot`, `default_*`): without fine-tuning the
        update is what recovers the loss (obd, 10 steps, 95%: 90.5% with it, 77.9% without,
        83.5% for magnitude); with fine-tuning obs + rows leads at 90-95% and obd without
        an update at 98.85%."""
        one_shot = self.finetune_epochs <= 0 and self.final_epochs <= 0
        if not (self._auto_obs() or (one_shot and self.structure == "unstructured")):
            return "none"
        if self.criterion_name not in CRITERIA:
            return "none"
        crit = make_run_criterion(self)
        factored = crit.uses_curvature and crit.fisher in ("kfac", "ekfac")
        return "rows" if factored and not getattr(crit, "reconstructs", False) else "none"

    def finetune_settings(self, epochs: float, lr: float | None = None) -> FinetuneSettings:
        """The fine-tuning phase settings for ``epochs`` epochs at rate ``lr`` (None = the
        ``lr`` setting; for 'auto', the smallest probe candidate, which serves validation
        only: the loop passes the probed rate). SettingError for a bad ``lr`` setting."""
        if lr is None:
            lr = lr_setting(self.lr)
            lr = LR_CANDIDATES[0] if lr == AUTO else lr
        return FinetuneSettings(
            epochs=epochs,
            optimizer=self.optimizer,
            lr=lr,
            lr_schedule=self.lr_schedule,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


@dataclass
class PruneResult:
    """The pruned model (in place), its masks (True = keep) and the report dict.

    teacher: the dense model's outputs {'train', 'val'} when distilling (else None).
    shrunk: with structure 'units', a new, physically smaller model without the removed
    units (``model`` keeps the full shapes, the units zeroed).
    """

    model: nn.Module
    masks: Masks
    report: dict
    metrics: list[dict] = field(default_factory=list)
    ntk: list[dict] = field(default_factory=list)
    probe: dict | None = None
    teacher: dict | None = None
    shrunk: nn.Module | None = None


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (cuda when available) as a torch.device."""
    if device not in DEVICES:
        raise choice_error("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' asked for but no CUDA GPU is available; use cpu")
    return torch.device(device)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_run_criterion(settings: PruneSettings):
    """The criterion object for ``settings`` (criterion defaults where fisher/labels are None)."""
    name = settings.criterion_name
    if name not in CRITERIA:
        raise choice_error("criterion", settings.criterion, criterion_choices())
    overrides = {
        "lam": settings.lam,
        "samples": settings.samples,
        "refit_basis_every": settings.refit_basis_every,
        "refit_basis_below": settings.refit_basis_below,
    }
    if settings.fisher is not None:
        overrides["fisher"] = settings.fisher
    if settings.labels is not None:
        overrides["labels"] = settings.labels
    return make_criterion(name, **overrides)


def criterion_choices() -> tuple[str, ...]:
    """The valid ``criterion`` settings: 'auto' and the registry's names."""
    return (AUTO_CRITERION, *CRITERIA)


def resolved_labels(crit, task: Task, classes: int | None = None) -> str:
    """The Fisher labels a criterion will use on ``task`` with ``classes`` outputs (its own,
    or the default: exact up to 32 classes, else sampled)."""
    return crit.labels_for(task, classes)
