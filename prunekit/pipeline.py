"""The only module that wires the rooms together: the pruning loop of design.md section 4.

load -> score -> next masks -> apply -> fine-tune -> metrics, for every step of the
schedule, then a final fine-tune and the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.analysis import log_spaced_iterations
from prunekit.analysis import ntk_alignment as _ntk_alignment
from prunekit.criteria import CRITERIA, make_criterion
from prunekit.criteria.capture import capture as _capture
from prunekit.criteria.fisher import check_labels
from prunekit.data import DataBundle, check_data_fits
from prunekit.errors import SettingError, choice_error
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.finetune.bn import has_batchnorm
from prunekit.prune.masks import SCOPES, apply_masks, full_masks, next_masks, sparsity_of
from prunekit.prune.schedules import schedule
from prunekit.prune.targets import find_targets
from prunekit.types import Masks, Target, Task, batch_to, make_task, num_rows, take_rows

log = logging.getLogger("prunekit")

# progress(label, done, total): the CLI draws bars from these calls; None = silent.
Progress = Callable[[str, int, int], None]
DEVICES = ("cpu", "cuda", "auto")
STEP_KEYS = (
    "step",
    "sparsity",
    "loss_after_prune",
    "accuracy_after_prune",
    "loss_after_finetune",
    "accuracy",
    "seconds",
    "ntk_alignment",
    "loss_before_compensation",
    "loss_after_compensation",
    "loss_before_recalibration",
    "loss_after_recalibration",
    "cosine_after_prune",
    "cosine",
)
NTK_MAX_OUTPUTS = 10
NTK_MAX_WEIGHTS = 500_000


@dataclass(frozen=True)
class PruneSettings:
    """Everything one pruning run needs besides the model and data.

    sparsity: final fraction of target weights pruned, in [0, 1); steps: pruning steps on
    the ``schedule`` ('exp', 'linear', 'cubic'); fisher/labels: curvature estimator and
    Fisher labels (None = the criterion's default); samples: labels drawn per example for
    'sampled'; lam: locality penalty; scope: 'global' or 'layer'; score_examples: training
    examples used to score (first N, fixed); score_batch_size: examples per scoring batch
    (memory: curvature passes hold every target layer's inputs and outputs for a batch);
    finetune_epochs: fine-tuning after each step (0 = the paper's mode: all steps first);
    final_epochs: the last fine-tune; batch_size, optimizer, lr, momentum, weight_decay:
    fine-tuning; include/exclude: target name patterns; seed: every random choice; device:
    'cpu', 'cuda' or 'auto'; ntk: log the tangent-kernel alignment (None = only when cheap,
    see ``ntk_is_cheap``); ntk_every: fine-tuning iterations to log at ('xM' log-spaced by
    factor M, 'N' every N); probe_train/probe_val: examples in the fixed NTK probes;
    refit_basis_every: EKFAC eigenbasis refit period in steps (0 = keep the first basis,
    refit only the scaling); compensate: apply the OBS update to surviving weights within
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
    is 'distill'); embeddings: also prune nn.Embedding weights (diagonal Fisher).
    """

    criterion: str = "obd"
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
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    refit_basis_every: int = 0
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

    def finetune_settings(self, epochs: float) -> FinetuneSettings:
        """The fine-tuning phase settings for ``epochs`` epochs."""
        return FinetuneSettings(
            epochs=epochs,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


@dataclass
class PruneResult:
    """The pruned model (in place), its masks (True = keep) and the report dict.

    teacher: the dense model's outputs {'train', 'val'} when distilling (else None).
    """

    model: nn.Module
    masks: Masks
    report: dict
    metrics: list[dict] = field(default_factory=list)
    ntk: list[dict] = field(default_factory=list)
    probe: dict | None = None
    teacher: dict | None = None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankSlice:
    """This rank's share of each global batch (examples rank, rank + world, ...).

    Every rank draws the same global permutation (same generator state), so together the
    ranks see exactly the batches of a one-process run; DDP averages their gradients.
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        share = slice(self.rank, None, self.world)
        for batch in self.batches:
            yield take_rows(batch, share)


def score_batches_of(data: DataBundle, examples: int, device, batch: int = 250) -> list:
    """The first ``examples`` training examples, this rank's share of them in a job, in
    batches of ``batch`` (the scoring passes' memory grows with it)."""
    rank, world = rank_and_world()
    share = slice(rank, None, world)
    first = take_rows((data.x_train, data.y_train), slice(0, examples))
    x, y = take_rows(first, share)
    n = num_rows(x)
    return [
        batch_to(take_rows(x if y is None else (x, y), slice(i, i + batch)), device)
        for i in range(0, n, batch)
    ]


TEACHER_FILE = "teacher.safetensors"


def _digest(named) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _fingerprints(model: nn.Module, data: DataBundle) -> dict[str, str]:
    """sha256 of the dense weights and of the data's inputs (split included): the keys of
    the teacher cache."""
    named = []
    for part, inputs in (("train", data.x_train), ("val", data.x_val)):
        columns = inputs if isinstance(inputs, dict) else {"x": inputs}
        named += [(f"{data.name}.{part}.{k}", v) for k, v in sorted(columns.items())]
    return {
        "prunekit.weights": _digest(sorted(model.state_dict().items())),
        "prunekit.inputs": _digest(named),
    }


def _cached_teacher(cache, keys: dict, resuming: bool) -> dict | None:
    """The cached outputs when their keys match (on resume the weights are no longer the
    dense ones, so only the inputs must match), else None."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    if cache is None or not Path(cache).is_file():
        return None
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata() or {}
    wanted = ["prunekit.inputs"] + ([] if resuming else ["prunekit.weights"])
    if any(meta.get(k) != keys[k] for k in wanted):
        return None
    log.info("reusing the dense model's outputs from %s", cache)
    return load_file(str(cache))


@torch.no_grad()
def _outputs_on(model: nn.Module, task: Task, inputs, batch: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [
        task.forward(model, batch_to(take_rows(inputs, slice(i, i + batch)), device))
        .detach()
        .float()
        .cpu()
        for i in range(0, num_rows(inputs), batch)
    ]
    return torch.cat(outs)


def teacher_outputs(
    model: nn.Module, task: Task, data: DataBundle, cache=None, resuming: bool = False
) -> dict:
    """The dense model's outputs {'train', 'val'} (float32, CPU) on every input, eval mode.

    cache: a file path; its outputs are reused when they were made from the same weights
    and inputs (sha256 keys in the metadata), else computed and written there. resuming:
    ``model`` holds a checkpoint's pruned weights, so the cache must exist and only its
    inputs must match (SettingError otherwise).
    """
    from pathlib import Path

    from prunekit.prune.state import save_tensors

    keys = _fingerprints(model, data)
    cached = _cached_teacher(cache, keys, resuming)
    if cached is not None:
        return cached
    if resuming:
        raise SettingError(
            "cannot resume this distillation run: its dense outputs are missing or were made "
            "from other data; start a new run without --resume"
        )
    was_training = model.training
    model.eval()
    try:
        out = {"train": _outputs_on(model, task, data.x_train)}
        out["val"] = _outputs_on(model, task, data.x_val)
    finally:
        model.train(was_training)
    if cache is not None:
        save_tensors(Path(cache), out, {"prunekit.kind": "teacher", **keys})
    return out


def prepare_task(
    model, data: DataBundle, settings: PruneSettings, task=None, cache=None, resuming=False
):
    """(task, data, teacher outputs or None) for a run.

    task: a Task or user object given through the API (a ``DistillationTask`` sets the
    distillation settings), else ``settings.task_spec`` is imported, else the built-in task
    for ``settings.loss`` / the data's labels. With loss 'distill' the data's targets become
    {'teacher': the dense model's outputs (``teacher_outputs``, cached at ``cache``),
    'labels': class labels when the data has them (for accuracy)} and the task a
    ``DistillationTask`` whose base task runs the model on the inputs alone. resuming: the
    model holds a checkpoint's weights; the cached dense outputs are required.
    Raises PrunekitError subclasses (one line) for tasks or data that cannot work.
    """
    import dataclasses

    from prunekit.tasks import DistillationTask, as_task, base_task, load_task

    if isinstance(task, DistillationTask):
        settings = dataclasses.replace(
            settings, loss="distill", distill_metric=task.metric, temperature=task.temperature
        )
        task = task.base
    _check_distill_settings(settings)
    user = as_task(task) if task is not None else None
    if user is None and settings.task_spec:
        user = load_task(settings.task_spec)
    base = base_task(settings.loss, data.kind, user)
    if settings.loss != "distill":
        return base, data, None
    return _distillation(model, data, settings, base, cache, resuming)


def _check_distill_settings(settings: PruneSettings) -> None:
    if settings.loss == "distill":
        return
    if settings.distill_metric != "auto" or settings.temperature != 1.0:
        raise SettingError(
            f"distill metric {settings.distill_metric!r} / temperature {settings.temperature!r} "
            f"only apply with --loss distill, not --loss {settings.loss}"
        )


def _distillation(model, data: DataBundle, settings: PruneSettings, base: Task, cache, resuming):
    from prunekit.tasks import DistillationTask, check_distillable, resolve_metric

    inputs = data.inputs_only()  # the base task sees exactly what the run will feed it
    outputs = check_data_fits(model, inputs, base, loss=False)
    classes = data.num_classes if data.kind == "classification" else 0
    metric = resolve_metric(settings.distill_metric, classes, outputs)
    check_distillable(outputs, metric)
    distill = DistillationTask(base, metric, settings.temperature)
    teacher = teacher_outputs(model, base, inputs, cache, resuming)
    distill.fit_variance(teacher["train"])
    targets = {}
    for part, labels in (("train", data.y_train), ("val", data.y_val)):
        targets[part] = {"teacher": distill.prepare(teacher[part])}
        if classes:
            targets[part]["labels"] = labels
    return distill, data.with_targets(targets["train"], targets["val"], "distill"), teacher


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (cuda when available) as a torch.device."""
    if device not in DEVICES:
        raise choice_error("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' asked for but no CUDA GPU is available; use cpu")
    return torch.device(device)


def make_run_criterion(settings: PruneSettings):
    """The criterion object for ``settings`` (criterion defaults where fisher/labels are None)."""
    if settings.criterion not in CRITERIA:
        raise choice_error("criterion", settings.criterion, CRITERIA)
    overrides = {
        "lam": settings.lam,
        "samples": settings.samples,
        "refit_basis_every": settings.refit_basis_every,
    }
    if settings.fisher is not None:
        overrides["fisher"] = settings.fisher
    if settings.labels is not None:
        overrides["labels"] = settings.labels
    return make_criterion(settings.criterion, **overrides)


def resolved_labels(crit, task: Task) -> str:
    """The Fisher labels a criterion will use on ``task`` (its own, or its estimator's default)."""
    return crit.labels_for(task)


def validate(settings: PruneSettings, model: nn.Module, data: DataBundle, task: Task):
    """Check every setting against model and data before any long work.

    Returns (criterion, schedule values, targets). Raises PrunekitError subclasses.
    """
    crit = make_run_criterion(settings)
    if settings.compensate and (not crit.uses_curvature or crit.fisher == "diag"):
        raise SettingError(
            f"--compensate needs a curvature criterion (obd, qm, obs) on kfac or ekfac, not "
            f"{settings.criterion!r} with fisher {crit.fisher!r}"
        )
    check_data_fits(model, data, task)
    labels = resolved_labels(crit, task) if crit.uses_curvature else None
    _check_distill_gradients(settings.criterion, crit, task, labels)
    if crit.uses_curvature:
        _check_label_source(labels, task, data, crit.samples)
    sparsities = schedule(settings.sparsity, settings.steps, settings.schedule)
    if settings.scope not in SCOPES:
        raise choice_error("scope", settings.scope, SCOPES)
    for name in ("score_examples", "score_batch_size", "batch_size"):
        if getattr(settings, name) < 1:
            raise SettingError(f"{name} must be >= 1, got {getattr(settings, name)!r}")
    settings.finetune_settings(settings.finetune_epochs)
    settings.finetune_settings(settings.final_epochs)
    log_spaced_iterations(10, settings.ntk_every)  # raises on a malformed schedule
    targets = find_targets(model, settings.include, settings.exclude, settings.embeddings)
    return crit, sparsities, targets


def _check_distill_gradients(name: str, crit, task: Task, labels: str | None) -> None:
    """Distillation starts at its optimum: the loss gradient is exactly zero at the dense
    model, so gradient-only scores and the empirical Fisher would rank nothing."""
    if task.kind != "distill":
        return
    if crit.uses_gradient and not crit.uses_curvature:
        raise SettingError(
            f"criterion {name!r} scores the loss gradient, which is zero at the dense "
            "model under --loss distill (the student is the teacher); use obd, qm, obs or "
            "magnitude"
        )
    if labels == "empirical":
        raise SettingError(
            "Fisher labels 'empirical' under --loss distill are gradients of a loss that is "
            "zero at the dense model (every score 0); use --fisher-labels sampled or exact"
        )


def _check_label_source(labels: str, task: Task, data: DataBundle, samples: int) -> None:
    """The Fisher labels must exist for this task and data (one-line errors otherwise)."""
    from prunekit.errors import DataError

    if labels == "exact" and not task.categorical:
        raise SettingError(
            f"Fisher labels 'exact' need a categorical output (a classifier or --loss distill "
            f"with kl), not a {task.kind!r} task; use --fisher-labels sampled or empirical"
        )
    batch = data.first_train(1, 1)[0]
    if labels == "sampled":
        if not task.can_sample:
            raise SettingError(
                "Fisher labels 'sampled' need a task with sample(outputs, generator); "
                "use --fisher-labels empirical"
            )
        _check_label_slot(task, batch)
    if labels == "empirical":
        try:
            task.targets(batch)
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(
                f"Fisher labels 'empirical' need labels, and data {data.name!r} has inputs only "
                "(use --fisher-labels sampled with a task that has sample(), or --loss distill)"
            ) from exc
    check_labels(labels, task, samples)


def _check_label_slot(task: Task, batch) -> None:
    """Sampled labels reach the loss through ``task.with_targets``: for dict batches the
    default writes ``batch[task.label_key]``, which the batch must already hold."""
    from prunekit.tasks import UserTask

    if not isinstance(batch, dict):
        return
    if isinstance(task, UserTask):
        custom = callable(getattr(task.obj, "with_targets", None))
    else:
        custom = type(task).with_targets is not Task.with_targets
    key = task.label_key
    if not custom and key not in batch:
        raise SettingError(
            f"sampled Fisher labels are written to batch[{key!r}], which the dict batches "
            f"(keys {sorted(batch)}) lack; give the task a label_key naming its label entry "
            "or a with_targets(batch, targets) method"
        )


def _eval(model: nn.Module, task: Task, data: DataBundle) -> dict:
    return evaluate(model, task, data.val_batches())


def _param_counts(model: nn.Module, targets: dict[str, Target]) -> dict[str, int]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    zeros_all = sum(int((p == 0).sum()) for p in params.values())
    prunable = sum(params[n].numel() for n in targets)
    zeros = sum(int((params[n] == 0).sum()) for n in targets)
    return {"total": total, "prunable": prunable, "zeros": zeros, "zeros_all": zeros_all}


def ntk_is_cheap(num_outputs: int, target_weights: int) -> bool:
    """The --ntk default: on for at most NTK_MAX_OUTPUTS outputs and NTK_MAX_WEIGHTS targets."""
    return num_outputs <= NTK_MAX_OUTPUTS and target_weights <= NTK_MAX_WEIGHTS


def _kernel_targets(y):
    """The NTK alignment's targets: the labels, or a distillation's teacher outputs."""
    return y["teacher"] if isinstance(y, dict) else y


class NtkLog:
    """Alignment on fixed train/validation probes, one ntk.jsonl record per call."""

    def __init__(self, model, task, data: DataBundle, settings: PruneSettings, targets):
        from prunekit.analysis import select_probe

        self.model, self.names = model, list(targets)
        self.kind = "classification" if data.kind == "classification" else "regression"
        self.probe = select_probe(
            data.n_train,
            data.n_val,
            settings.probe_train,
            settings.probe_val,
            seed=settings.seed,
        )
        device = next(model.parameters()).device
        self.train = (
            data.x_train[self.probe["train"]].to(device),
            _kernel_targets(data.y_train)[self.probe["train"]].to(device),
        )
        self.val = (
            data.x_val[self.probe["val"]].to(device),
            _kernel_targets(data.y_val)[self.probe["val"]].to(device),
        )
        self.records: list[dict] = []

    def __call__(self, step: int, phase: str, iteration, sparsity: float, masks: Masks) -> float:
        """Log one record; returns the training-probe alignment."""
        from prunekit.analysis import ntk_record

        results = [
            ntk_alignment(
                self.model,
                x,
                y,
                masks=masks,
                targets_kind=self.kind,
                params=self.names,
                memory_budget_mb=1024.0,
            )
            for x, y in (self.train, self.val)
        ]
        self.records.append(ntk_record(step, phase, iteration, sparsity, *results))
        return results[0]["alignment"]


@dataclass
class _Run:
    """Mutable state of one pruning run (kept out of the frozen settings)."""

    model: nn.Module
    task: Task
    data: DataBundle
    settings: PruneSettings
    targets: dict[str, Target]
    masks: Masks
    gen: torch.Generator
    progress: Progress | None
    ntk: NtkLog | None = None
    rows: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    estimators: dict[str, str] = field(default_factory=dict)
    use_recalibration: bool = False
    dense: dict | None = None
    pruned: dict | None = None

    def obs_deltas(self, curvature) -> dict:
        """OBS updates for the current masks, computed from the weights before zeroing."""
        from prunekit.criteria.obs import obs_update

        params = dict(self.model.named_parameters())
        return obs_update(curvature, params, self.masks, absolute=self.settings.lam)

    def compensate(self, deltas: dict, before: dict) -> dict:
        """Add the OBS updates to the surviving weights; returns losses before and after."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, delta in deltas.items():
                keep = self.masks.get(name)
                delta = delta if keep is None else delta * keep.to(delta.dtype)
                params[name].add_(delta.to(params[name].dtype))
        apply_masks(self.model, self.masks)
        after = _eval(self.model, self.task, self.data)
        return {
            "loss_before_compensation": before["loss"],
            "loss_after_compensation": after["loss"],
        }

    def recalibrate(self, loss_before: float | None) -> dict:
        """Re-estimate BatchNorm statistics on training batches; returns the loss change."""
        if not self.use_recalibration:
            return {}
        from prunekit.finetune.bn import recalibrate_bn

        before = loss_before if loss_before is not None else self.pruned["loss"]
        batches = self.data.train_batches(self.settings.batch_size, self.gen)
        recalibrate_bn(self.model, batches, forward=self.task.forward, max_batches=20)
        after = _eval(self.model, self.task, self.data)
        return {"loss_before_recalibration": before, "loss_after_recalibration": after["loss"]}

    def finetune(self, epochs: float, label: str, step: int, sparsity: float) -> None:
        """One mask-respecting fine-tuning phase, logging NTK at log-spaced iterations."""
        if epochs <= 0:
            return
        phase = self.settings.finetune_settings(epochs)
        batches = self.data.train_batches(self.settings.batch_size, self.gen)
        progress = self.progress
        tick = (lambda done, total: progress(label, done, total)) if progress else None
        on_step = None
        if self.ntk is not None:
            from prunekit.analysis import log_spaced_iterations

            total = phase.total_steps(len(batches))
            when = set(log_spaced_iterations(total, self.settings.ntk_every)) - {0, total}

            def on_step(it: int) -> None:
                if it in when:
                    self.ntk(step, "finetune", it, sparsity, self.masks)

        model, train_masks = self.model, self.masks
        rank, world = rank_and_world()
        if world > 1:  # DistributedDataParallel over this rank's share of every batch
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.model)
            train_masks = {f"module.{n}": m for n, m in self.masks.items()}
            batches = RankSlice(batches, rank, world)
        finetune(
            model, self.task, batches, phase, masks=train_masks, progress=tick, on_step=on_step
        )

    def record(self, step: int, after_prune: dict, seconds: float, ntk_value) -> None:
        """Append the metrics row of ``step`` (evaluated now, after its fine-tune)."""
        after = _eval(self.model, self.task, self.data)
        global_sparsity, per_layer = sparsity_of(self.masks)
        self.rows.append(
            {
                "step": step,
                "sparsity": global_sparsity,
                "per_layer": per_layer,
                "loss_after_prune": after_prune["loss"],
                "accuracy_after_prune": after_prune["accuracy"],
                "loss_after_finetune": after["loss"],
                "accuracy": after["accuracy"],
                "seconds": seconds,
                "ntk_alignment": ntk_value,
            }
        )
        if "cosine" in after:  # distillation: similarity to the dense outputs
            self.rows[-1].update(cosine_after_prune=after_prune["cosine"], cosine=after["cosine"])


def _start_run(model, data, settings, task, progress) -> tuple[_Run, object, list[float]]:
    device = resolve_device(settings.device)
    model.to(device)
    crit, sparsities, targets = validate(settings, model, data, task)
    torch.manual_seed(settings.seed)
    params = dict(model.named_parameters())
    masks = full_masks({n: params[n] for n in targets})
    run = _Run(
        model,
        task,
        data,
        settings,
        targets,
        masks,
        torch.Generator().manual_seed(settings.seed),
        progress,
    )
    run.use_recalibration = (
        has_batchnorm(model) if settings.recalibrate_bn is None else settings.recalibrate_bn
    )
    unsupported = _ntk_unsupported(model, task, data)
    if settings.ntk and unsupported:
        raise SettingError(f"--ntk needs {unsupported}; use --no-ntk")
    use_ntk = settings.ntk
    if use_ntk is None and not unsupported:
        classifier = data.kind == "classification"
        outputs = data.num_classes if classifier else _kernel_targets(data.y_train)[0].numel()
        use_ntk = ntk_is_cheap(outputs, sum(t.numel for t in targets.values()))
    if use_ntk:
        run.ntk = NtkLog(model, task, data, settings, targets)
    return run, crit, sparsities


def _ntk_unsupported(model: nn.Module, task: Task, data: DataBundle) -> str | None:
    """Why the NTK log cannot run on this model/task/data, or None when it can."""
    if isinstance(model, torch.jit.ScriptModule):
        return "an eager nn.Module, not a TorchScript archive"
    if isinstance(data.x_train, dict) or data.y_train is None:
        return "tensor inputs and targets (this data has dict inputs or no targets)"
    runner = task.base if task.kind == "distill" else task
    if type(runner) is not Task and runner.kind not in ("classification", "regression"):
        return f"a built-in task (outputs = model(inputs)), not a {runner.kind!r} task"
    return None


def _ntk_now(run: _Run, step: int, phase: str, sparsity: float):
    return run.ntk(step, phase, None, sparsity, run.masks) if run.ntk is not None else None


def _cache_tensors(cache: dict) -> tuple[dict, dict]:
    """EKFAC cache (kept eigenbasis) as flat tensors plus JSON-able metadata."""
    import dataclasses

    basis = cache.get("ekfac_basis")
    meta: dict = {"ekfac_step": cache.get("ekfac_step")}
    tensors: dict = {}
    if basis is None:
        return tensors, meta
    meta["layers"] = {n: dataclasses.asdict(layer) for n, layer in basis.layers.items()}
    for f in dataclasses.fields(basis):
        if f.name != "layers":
            for name, t in getattr(basis, f.name).items():
                tensors[f"cache/{f.name}/{name}"] = t
    return tensors, meta


def _restore_cache(tensors: dict, meta: dict) -> dict:
    import dataclasses

    from prunekit.criteria.ekfac import EKFACBasis
    from prunekit.criteria.kfac import Layer

    if "layers" not in meta:
        return {}
    fields = {f.name: {} for f in dataclasses.fields(EKFACBasis) if f.name != "layers"}
    for key, t in tensors.items():
        if key.startswith("cache/"):
            _, fname, name = key.split("/", 2)
            fields[fname][name] = t
    layers = {n: Layer(**{**d, "shape": tuple(d["shape"])}) for n, d in meta["layers"].items()}
    return {"ekfac_basis": EKFACBasis(layers=layers, **fields), "ekfac_step": meta["ekfac_step"]}


def save_state(run: _Run, state_dir, step: int, state_info: dict | None) -> None:
    """Checkpoint everything needed to continue bit-identically after ``step``."""
    from prunekit.prune.state import save_step_state

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


def restore_state(run: _Run, state_dir, state_info: dict | None) -> int:
    """Load the latest checkpoint into ``run``; returns its step (0 when there is none).

    Refuses (SettingError naming the keys) a checkpoint made with another recipe.
    """
    from prunekit.prune.state import load_step_state

    loaded = load_step_state(state_dir) if state_dir is not None else None
    if loaded is None:
        return 0
    tensors, info = loaded
    _check_same_recipe(info, state_info or {})
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    device = next(run.model.parameters()).device
    run.masks = {n: tensors[f"mask/{n}"].bool().to(device) for n in run.masks}
    run.gen.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    run.cache = _restore_cache(tensors, info["cache"])
    run.rows, run.dense, run.pruned = info["rows"], info["dense"], info["pruned"]
    run.estimators = info["estimators"]
    if run.ntk is not None:
        run.ntk.records = info["ntk"]
    return int(info["step"])


def _check_same_recipe(info: dict, state_info: dict) -> None:
    if info.get("recipe_hash") == state_info.get("recipe_hash"):
        return
    from prunekit.recipe import changed_keys

    changed = changed_keys(info.get("recipe") or {}, state_info.get("recipe") or {})
    raise SettingError(
        f"cannot resume: the recipe changed since the checkpoint (keys {changed or ['?']}); "
        "restore it or start a new run without --resume"
    )


def _prune_step(run: _Run, crit, score_batches, k: int, target: float, n_steps: int) -> None:
    """Score, mask, (compensate), fine-tune and record step ``k`` of ``n_steps``."""
    t0 = time.perf_counter()
    model, task, settings = run.model, run.task, run.settings
    masks = run.masks if settings.masked_scaling else None
    scored = crit.evaluate(
        model, task, run.targets, score_batches, generator=run.gen, masks=masks, cache=run.cache
    )
    run.estimators = scored.estimators or run.estimators
    if run.progress:
        run.progress("score", k, n_steps)
    run.masks = next_masks(scored.scores, run.masks, target, settings.scope)
    deltas = run.obs_deltas(scored.curvature) if settings.compensate else None
    apply_masks(model, run.masks)
    run.pruned = _eval(model, task, run.data)
    compensation = run.compensate(deltas, run.pruned) if deltas is not None else {}
    compensation.update(run.recalibrate(compensation.get("loss_after_compensation")))
    _ntk_now(run, k, "prune", target)
    run.finetune(settings.finetune_epochs, f"fine-tune step {k}", k, target)
    run.record(k, run.pruned, time.perf_counter() - t0, _ntk_now(run, k, "finetune", target))
    run.rows[-1].update(compensation)
    log.info("step %d/%d sparsity %.4f", k, n_steps, target)
    if run.progress:
        run.progress("steps", k, n_steps)


def run_pruning(
    model: nn.Module,
    data: DataBundle,
    settings: PruneSettings,
    task: Task | None = None,
    progress: Progress | None = None,
    state_dir=None,
    resume: bool = False,
    state_info: dict | None = None,
) -> PruneResult:
    """Prune ``model`` in place following ``settings``; return masks, metrics and report.

    Every setting is validated against the model and the data before any long work.
    state_dir: checkpoint every finished step there (weights, masks, RNG states, EKFAC
    basis, metrics so far), tagged with ``state_info`` (e.g. the recipe and its hash);
    resume: continue from the latest checkpoint, ending bit-identical (CPU) to an
    uninterrupted run.
    """
    start = time.perf_counter()
    cache, resuming = None, False
    if state_dir is not None:
        from pathlib import Path

        from prunekit.prune.state import STATE_DIR, load_step_state

        cache = Path(state_dir) / STATE_DIR / TEACHER_FILE
        resuming = resume and load_step_state(state_dir) is not None
    model.to(resolve_device(settings.device))
    task, data, teacher = prepare_task(model, data, settings, task, cache, resuming)
    run, crit, sparsities = _start_run(model, data, settings, task, progress)
    device = next(model.parameters()).device
    score_batches = score_batches_of(
        data, settings.score_examples, device, settings.score_batch_size
    )
    first = restore_state(run, state_dir, state_info) + 1 if resume else 1
    if first == 1:
        run.dense = _eval(model, task, data)
        run.record(0, run.dense, 0.0, _ntk_now(run, 0, "dense", 0.0))
    for k in range(first, len(sparsities) + 1):
        _prune_step(run, crit, score_batches, k, sparsities[k - 1], len(sparsities))
        if state_dir is not None:
            save_state(run, state_dir, k, state_info)
    run.finetune(settings.final_epochs, "final fine-tune", len(sparsities), settings.sparsity)
    final_ntk = _ntk_now(run, len(sparsities), "final", settings.sparsity)
    metrics = {"dense": run.dense, "pruned": run.pruned, "finetuned": _eval(model, task, data)}
    estimators = run.estimators
    report = build_report(
        settings,
        crit,
        task,
        model,
        run.targets,
        run.masks,
        run.rows,
        estimators,
        metrics,
        time.perf_counter() - start,
    )
    report["ntk"] = {"enabled": run.ntk is not None, "final_alignment": final_ntk}
    report["bn_recalibration"] = run.use_recalibration
    report["task"] = _task_report(task, settings)
    ntk_records = run.ntk.records if run.ntk is not None else []
    probe = run.ntk.probe if run.ntk is not None else None
    return PruneResult(model, run.masks, report, run.rows, ntk_records, probe, teacher)


def _task_report(task: Task, settings: PruneSettings) -> dict:
    """report.json 'task': kind, the user task's spec, and distillation settings."""
    out = {"kind": task.kind, "spec": settings.task_spec, "loss": settings.loss}
    if task.kind == "distill":
        out.update(
            distill_metric=task.metric, temperature=task.temperature, variance=task.variance
        )
    return out


_GATES = {"LSTM": ("input", "forget", "cell", "output"), "GRU": ("reset", "update", "new")}


def _gate_sparsity(model: nn.Module, targets: dict[str, Target], masks: Masks) -> dict:
    """Recurrent targets: fraction pruned per gate (rows split in gate blocks, torch order).

    nn.LSTM and BN-LSTM cells stack gates i, f, g, o; nn.GRU r, z, n.
    """
    modules = dict(model.named_modules())
    out = {}
    for name, target in targets.items():
        if target.kind != "recurrent":
            continue
        module = modules[target.module]
        kind = getattr(module, "original_name", None) or type(module).__name__
        gates = _GATES["GRU"] if kind == "GRU" else _GATES["LSTM"] if "LSTM" in kind else None
        rows = masks[name].shape[0]
        if gates is None or rows % len(gates):
            continue
        blocks = masks[name].reshape(len(gates), rows // len(gates), -1)
        out[name] = {g: float((~b).float().mean()) for g, b in zip(gates, blocks, strict=True)}
    return out


def build_report(settings, crit, task, model, targets, masks, rows, estimators, metrics, seconds):
    """report.json content (design.md section 6 keys, plus settings and counts)."""
    global_sparsity, per_layer = sparsity_of(masks)
    counts = _param_counts(model, targets)
    return {
        "criterion": settings.criterion,
        "fisher": crit.fisher if crit.uses_curvature else None,
        "fisher_labels": resolved_labels(crit, task) if crit.uses_curvature else None,
        "estimators": estimators,
        "lambda": settings.lam,
        "scope": settings.scope,
        "schedule": {"kind": settings.schedule, "steps": settings.steps},
        "target_sparsity": settings.sparsity,
        "sparsity": {
            "global": global_sparsity,
            "all_parameters": counts["zeros_all"] / counts["total"],
            "per_layer": per_layer,
            "per_gate": _gate_sparsity(model, targets, masks),
        },
        "params": counts,
        "metrics": metrics,
        "steps": [{k: r[k] for k in STEP_KEYS if k in r} for r in rows[1:]],
        "seconds": seconds,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
        },
    }


def resolve_data(data, seed: int = 0) -> DataBundle:
    """A DataBundle from a spec string, a DataBundle, or an iterable of (inputs, targets)."""
    from prunekit.data import bundle_from_batches, load_data

    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        return load_data(data, seed=seed)
    return bundle_from_batches(data, seed=seed)


def write_run(out, result: PruneResult, arch: str | None, data_name: str) -> list:
    """Write the run directory of design.md section 6 (each file atomically)."""
    from pathlib import Path

    from prunekit.checkpoint import ARCH_KEY
    from prunekit.prune.state import save_masks, save_tensors, write_json, write_jsonl

    out = Path(out)
    meta = {
        "prunekit.criterion": result.report["criterion"],
        "prunekit.sparsity": f"{result.report['sparsity']['global']:.6f}",
        "prunekit.data": data_name,
        "prunekit.step": str(len(result.report["steps"])),
    }
    if arch:
        meta[ARCH_KEY] = arch
    state = result.model.state_dict()
    extra = []
    if result.probe is not None:
        from prunekit.analysis.probe import save_probe

        extra += [write_jsonl(out / "ntk.jsonl", result.ntk), save_probe(out, result.probe)]
    if result.teacher is not None:
        teacher_meta = {"prunekit.kind": "teacher", "prunekit.data": data_name}
        extra.append(save_tensors(out / TEACHER_FILE, result.teacher, teacher_meta))
    return extra + [
        save_tensors(out / "model.safetensors", state, meta),
        save_masks(out / "masks.safetensors", result.masks, meta),
        write_jsonl(out / "metrics.jsonl", result.metrics),
        write_json(out / "report.json", result.report),
    ]


def train_example(name: str, seed: int = 0, progress: Progress | None = None):
    """Train the zoo example ``name`` on its bundled data.

    Returns (model, arch spec, data name, validation metrics dict).
    """
    from prunekit.checkpoint import build_model
    from prunekit.data import load_data
    from prunekit.models import EXAMPLES

    if name not in EXAMPLES:
        raise choice_error("example", name, EXAMPLES)
    ex = EXAMPLES[name]
    torch.manual_seed(seed)
    data = load_data(ex.data, seed=seed)
    model = build_model(ex.arch)
    check_data_fits(model, data)
    task = make_task(data.kind)
    gen = torch.Generator().manual_seed(seed)
    phase = FinetuneSettings(epochs=ex.epochs, lr=ex.lr, lr_schedule="cosine")
    tick = (lambda done, total: progress("train", done, total)) if progress else None
    finetune(model, task, data.train_batches(100, gen), phase, progress=tick)
    return model, ex.arch, ex.data, _eval(model, task, data)


def _settings_from(kwargs: dict) -> PruneSettings:
    known = set(PruneSettings.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SettingError(f"unknown settings {unknown}; valid: {', '.join(sorted(known))}")
    return PruneSettings(**kwargs)


def prune(model: nn.Module, data, task: Task | None = None, out=None, **settings) -> PruneResult:
    """Python API of `prunekit prune`: prune ``model`` in place.

    data: a spec string ('digits', 'mnist5k', 'synthetic', 'file.npz', 'module:function'),
    a DataBundle, or an iterable of batches ((inputs, targets) pairs or inputs alone;
    tensors or dicts of tensors); task: a Task, or any object with forward(model, batch)
    and loss(outputs, batch) (None = the built-in task for the data, or loss='distill');
    settings: PruneSettings fields (criterion, sparsity, steps, loss, ...); out: optional
    run directory to write.
    The global torch RNG is seeded with ``seed`` (dropout during fine-tuning must be
    reproducible); save it with ``torch.get_rng_state()`` first if the caller needs it.
    """
    cfg = _settings_from(settings)
    bundle = resolve_data(data, seed=cfg.seed)
    result = run_pruning(model, bundle, cfg, task=task)
    if out is not None:
        write_run(out, result, None, bundle.name)
    return result


def _scoring_inputs(model, data, task, examples: int, include=(), exclude=()):
    from prunekit.tasks import as_task, base_task

    bundle = resolve_data(data)
    task = base_task("auto", bundle.kind, as_task(task) if task is not None else None)
    check_data_fits(model, bundle, task)
    targets = find_targets(model, tuple(include), tuple(exclude))
    return bundle.first_train(examples), task, targets


def score(
    model: nn.Module,
    data,
    criterion: str = "obd",
    task: Task | None = None,
    examples: int = 1000,
    seed: int = 0,
    **settings,
) -> dict[str, torch.Tensor]:
    """Scores (higher = keep) of every target weight; settings are the criterion's fields."""
    crit = make_criterion(criterion, **settings)
    batches, task, targets = _scoring_inputs(model, data, task, examples)
    gen = torch.Generator().manual_seed(seed)
    return crit.evaluate(model, task, targets, batches, generator=gen).scores


def fisher_diagonal(
    model: nn.Module,
    data,
    estimator: str = "ekfac",
    labels: str | None = None,
    task: Task | None = None,
    examples: int = 1000,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fisher diagonal of every target weight, shaped like it (float32).

    estimator: 'ekfac', 'kfac' or 'diag' (the structure); labels: 'exact', 'sampled' or
    'empirical' (where the gradient's labels come from; None = the estimator's default).
    """
    from prunekit.criteria import fit_curvature
    from prunekit.criteria.curvature import default_labels

    batches, task, targets = _scoring_inputs(model, data, task, examples)
    labels = labels or default_labels(estimator, task)
    check_labels(labels, task, samples)
    gen = torch.Generator().manual_seed(seed)
    curvature = fit_curvature(
        estimator, model, task, targets, batches, labels=labels, samples=samples, generator=gen
    )
    return curvature.diagonal()


def export_model(
    model: nn.Module,
    path,
    data: DataBundle,
    masks: Masks | None = None,
    storage: str = "packed",
    quantize: str | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    receipt_path=None,
) -> dict:
    """Export ``model`` to ONNX at ``path``, verified on the validation split; write export.json.

    The receipt goes to ``receipt_path`` (default: export.json beside the ONNX file).
    """
    from pathlib import Path

    from prunekit.export import export_onnx, write_receipt

    path = Path(path)
    x_val = take_rows(data.x_val, slice(0, 512))
    y_val = data.y_val[:512] if data.kind == "classification" else None
    receipt = export_onnx(
        model,
        path,
        example_input=take_rows(x_val, slice(0, 8)),
        storage=storage,
        quantize=quantize,
        opset=opset,
        masks=masks,
        verify_inputs=x_val,
        verify_targets=y_val,
        overwrite=overwrite,
    )
    write_receipt(receipt, Path(receipt_path) if receipt_path else path.with_name("export.json"))
    return receipt


def ntk_alignment(model: nn.Module, inputs, targets, masks: Masks | None = None, **kwargs) -> dict:
    """Tangent-kernel alignment of ``model`` on (inputs, targets) (see prunekit.analysis).

    Returns ``alignment``, ``per_layer`` (name -> float), ``effective_rank`` and ``trace``;
    pruned weights (mask False) are left out of the kernel. Linear layers use the exact
    factored kernel (layer inputs x output gradients, captured by prunekit's hooks).
    """
    kwargs.setdefault("capture", _capture)  # Linear layers through the exact factored form
    return _ntk_alignment(model, inputs, targets, masks=masks, **kwargs)


def export_onnx(model: nn.Module, path, example_input, storage: str = "packed", **kwargs) -> dict:
    """Export a pruned model to ONNX, verify it in onnxruntime, return the receipt dict."""
    from prunekit.export import export_onnx as _export_onnx

    return _export_onnx(model, path, example_input, storage=storage, **kwargs)


def recipe_choices() -> dict:
    """Registry name -> valid names, for recipe validation (the CLI's choices too)."""
    from prunekit.criteria.curvature import ESTIMATORS
    from prunekit.criteria.fisher import LABELS
    from prunekit.export import QUANTIZE_MODES, STORAGE_MODES
    from prunekit.finetune import OPTIMIZERS
    from prunekit.prune.schedules import SCHEDULES
    from prunekit.tasks import DISTILL_METRICS, LOSSES

    return {
        "loss": LOSSES,
        "distill_metric": DISTILL_METRICS,
        "criterion": CRITERIA,
        "fisher": ESTIMATORS,
        "labels": LABELS,
        "scope": SCOPES,
        "schedule": SCHEDULES,
        "optimizer": OPTIMIZERS,
        "storage": STORAGE_MODES,
        "quantize": QUANTIZE_MODES,
    }


def load_checked_recipe(path, overrides=()) -> dict:
    """Load a recipe (schema, types, ranges and registry names, with line numbers)."""
    from prunekit.recipe import load_recipe

    return load_recipe(path, list(overrides), choices=recipe_choices())


def settings_from_recipe(recipe: dict) -> PruneSettings:
    """PruneSettings of a resolved recipe (see prunekit.recipe.SCHEMA)."""
    crit, sched, ft, an = (recipe[k] for k in ("criterion", "schedule", "finetune", "analysis"))
    return PruneSettings(
        criterion=crit["name"],
        sparsity=sched["final"],
        steps=sched["steps"],
        schedule=sched["kind"],
        fisher=crit["fisher"],
        labels=crit["labels"],
        samples=crit["samples"],
        lam=float(crit["lambda"]),
        scope=crit["scope"],
        score_examples=crit["score_examples"],
        score_batch_size=crit["score_batch_size"],
        finetune_epochs=float(ft["epochs_per_step"]),
        final_epochs=float(ft["final_epochs"]),
        batch_size=ft["batch_size"],
        optimizer=ft["optimizer"],
        lr=float(ft["lr"]),
        momentum=float(ft["momentum"]),
        weight_decay=float(ft["weight_decay"]),
        include=tuple(recipe["targets"]["include"]),
        exclude=tuple(recipe["targets"]["exclude"]),
        embeddings=recipe["targets"]["embeddings"],
        seed=recipe["seed"],
        refit_basis_every=crit["refit_basis_every"],
        masked_scaling=crit["masked_scaling"],
        compensate=crit["compensate"],
        recalibrate_bn=recipe["finetune"]["recalibrate_bn"],
        ntk=an["ntk"],
        ntk_every=an["ntk_every"],
        loss=recipe["task"]["loss"],
        distill_metric=recipe["task"]["distill_metric"],
        temperature=float(recipe["task"]["temperature"]),
        task_spec=recipe["task"]["spec"],
    )


def recipe_model(recipe: dict, progress: Progress | None = None, train: bool = True):
    """(model, arch spec) of a recipe: a trained zoo example or a loaded checkpoint.

    train=False builds the example's architecture untrained (for resume and validation).
    """
    from prunekit.checkpoint import build_model, load_model
    from prunekit.models import EXAMPLES

    spec = recipe["model"]
    if spec["example"]:
        if spec["example"] not in EXAMPLES:
            raise choice_error("model.example", spec["example"], EXAMPLES)
        if not train:
            return build_model(EXAMPLES[spec["example"]].arch), EXAMPLES[spec["example"]].arch
        model, arch, _, _ = train_example(spec["example"], seed=recipe["seed"], progress=progress)
        return model, arch
    loaded = load_model(spec["checkpoint"], arch=spec["arch"])
    return loaded.model, loaded.arch


def run_recipe(recipe: dict, out, resume: bool = False, progress: Progress | None = None):
    """Run a resolved recipe into run directory ``out``; returns (report, checks rows).

    Every finished step is checkpointed under out/state; with ``resume`` the run
    continues from there (a changed recipe is refused). Export and checks come last.
    """
    from pathlib import Path

    from prunekit.data import load_data
    from prunekit.prune.state import load_step_state, write_json
    from prunekit.recipe import evaluate_checks, recipe_hash

    out = Path(out)
    validate_recipe(recipe)  # every setting before any training or data loading
    settings = settings_from_recipe(recipe)
    data = load_data(recipe["data"], seed=recipe["seed"])
    has_state = resume and load_step_state(out) is not None
    model, arch = recipe_model(recipe, progress, train=not has_state)
    info = {"recipe_hash": recipe_hash(recipe), "recipe": recipe}
    result = run_pruning(
        model, data, settings, progress=progress, state_dir=out, resume=resume, state_info=info
    )
    write_run(out, result, arch, recipe["data"])
    receipt = None
    if recipe["export"]["enabled"]:
        receipt = export_model(
            result.model,
            out / "model.onnx",
            data,
            masks=result.masks,
            storage=recipe["export"]["storage"],
            quantize=recipe["export"]["quantize"],
            overwrite=True,
        )
    checks = evaluate_checks(recipe["checks"], result.report, receipt)
    result.report["checks"] = checks
    result.report["recipe"] = {"name": recipe["name"], "hash": info["recipe_hash"]}
    write_json(out / "report.json", result.report)
    return result.report, checks


def _meta_model(recipe: dict) -> nn.Module | None:
    """The recipe's architecture built on the meta device (no weights, no compute)."""
    from pathlib import Path

    from prunekit.checkpoint import ARCH_KEY, build_model

    spec = recipe["model"]
    arch = spec["arch"]
    if spec["example"]:
        from prunekit.models import EXAMPLES

        if spec["example"] not in EXAMPLES:
            raise choice_error("model.example", spec["example"], EXAMPLES)
        arch = EXAMPLES[spec["example"]].arch
    elif not Path(spec["checkpoint"]).is_file():
        raise SettingError(f"model.checkpoint {spec['checkpoint']!r} does not exist")
    elif arch is None and spec["checkpoint"].endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(spec["checkpoint"], framework="pt") as f:
            arch = (f.metadata() or {}).get(ARCH_KEY)
    if arch is None:
        return None  # TorchScript or pickle: targets are known only once loaded
    with torch.device("meta"):
        return build_model(arch)


def validate_recipe(recipe: dict) -> dict:
    """Check a resolved recipe's settings and resolve its targets on the meta device.

    Returns {'targets': name -> numel (None if the model can't be built without loading),
    'steps': schedule values}. Raises PrunekitError subclasses naming the bad value.
    """
    settings = settings_from_recipe(recipe)
    make_run_criterion(settings)
    sparsities = schedule(settings.sparsity, settings.steps, settings.schedule)
    if settings.scope not in SCOPES:
        raise choice_error("scope", settings.scope, SCOPES)
    settings.finetune_settings(settings.finetune_epochs)
    settings.finetune_settings(settings.final_epochs)
    log_spaced_iterations(10, settings.ntk_every)  # raises on a malformed schedule
    if recipe["export"]["enabled"]:
        from prunekit.export import check_modes

        check_modes(recipe["export"]["storage"], recipe["export"]["quantize"])
    _check_recipe_task(recipe)
    model = _meta_model(recipe)
    targets = None
    if model is not None:
        found = find_targets(model, settings.include, settings.exclude, settings.embeddings)
        targets = {n: t.numel for n, t in found.items()}
    return {"targets": targets, "steps": sparsities}


def _check_recipe_task(recipe: dict) -> None:
    """The task section and the gates it makes measurable, in the recipe's own keys."""
    from prunekit.tasks import load_task

    task, checks = recipe["task"], recipe["checks"]
    distill = task["loss"] == "distill"
    if not distill and (task["distill_metric"] != "auto" or task["temperature"] != 1.0):
        raise SettingError(
            "task.distill_metric and task.temperature only apply with task.loss: distill, "
            f"not {task['loss']!r}"
        )
    if task["spec"] is not None:
        load_task(task["spec"])  # imports now: a typo fails here, not after training
        if task["loss"] not in ("auto", "distill"):
            raise SettingError(
                f"task.loss {task['loss']!r} would replace the loss of task.spec; use auto "
                "(the spec's loss) or distill"
            )
    if checks["min_cosine"] is not None and not distill:
        raise SettingError("checks.min_cosine is measured only with task.loss: distill")
    if checks["max_accuracy_drop"] is not None and distill and task["distill_metric"] in (
        "mse", "cosine",
    ):  # fmt: skip
        raise SettingError(
            f"checks.max_accuracy_drop needs accuracy, which distillation with "
            f"{task['distill_metric']!r} does not measure; use checks.min_cosine"
        )


def _label_terms(crit, classes: int) -> int:
    labels = crit.labels
    if labels == "exact":
        return classes
    return crit.samples if labels == "sampled" else 1


def explain_recipe(recipe: dict) -> dict:
    """The step timeline of a recipe without any training or scoring.

    Returns {'rows': [...], 'totals': {...}, 'notes': [...]}; each row has step, sparsity
    (global, over targets), kept weights, per-layer sparsity for layer scope, fine-tuning
    epochs, and estimated example-passes (forward / backward) for scoring and fine-tuning.
    """
    from prunekit.data import load_data

    checked = validate_recipe(recipe)
    settings = settings_from_recipe(recipe)
    crit = make_run_criterion(settings)
    data = load_data(recipe["data"], seed=recipe["seed"])
    n_train, n_score = data.n_train, min(settings.score_examples, data.n_train)
    total = sum(checked["targets"].values()) if checked["targets"] else None
    terms = _label_terms(crit, max(data.num_classes, 1)) if crit.uses_curvature else 0
    rows = []
    for k, s in enumerate(checked["steps"], start=1):
        passes = 2 if crit.uses_curvature and crit.fisher == "ekfac" and k == 1 else 1
        score_fwd = n_score * (int(crit.uses_gradient) + passes * int(crit.uses_curvature))
        score_bwd = n_score * (int(crit.uses_gradient) + passes * terms)
        ft = settings.finetune_epochs * n_train
        rows.append(
            {
                "step": k,
                "sparsity": s,
                "kept": None if total is None else total - round(s * total),
                "per_layer": s if settings.scope == "layer" else None,
                "finetune_epochs": settings.finetune_epochs,
                "score_forward": score_fwd,
                "score_backward": score_bwd,
                "finetune_forward": ft,
                "finetune_backward": ft,
            }
        )
    final_ft = settings.final_epochs * n_train
    totals = {
        key: sum(r[key] for r in rows)
        for key in ("score_forward", "score_backward", "finetune_forward", "finetune_backward")
    }
    totals["finetune_forward"] += final_ft
    totals["finetune_backward"] += final_ft
    notes = [
        f"{n_train} training examples, {n_score} scored; final fine-tune "
        f"{settings.final_epochs:g} epochs; passes counted per example"
    ]
    if settings.scope == "global":
        notes.append("global scope: per-layer sparsity depends on the scores (known after run)")
    if settings.loss == "distill":
        notes.append(
            f"distillation: one forward pass of the dense model over all "
            f"{data.n_train + data.n_val} examples first (targets, cached in the run)"
        )
    return {"rows": rows, "totals": totals, "notes": notes, "targets": checked["targets"]}
