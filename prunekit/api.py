"""The Python API (re-exported from ``prunekit``): the same operations as the CLI commands.

``prune`` runs the loop (prunekit.loop); ``score``, ``fisher_diagonal`` and
``ntk_alignment`` are one-shot diagnostics; ``export_onnx`` / ``export_model`` export and
verify; ``train_example`` trains a zoo example. Each is thin: it resolves the data and the
task, then calls the room that does the work.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prunekit.analysis import ntk_alignment as _ntk_alignment
from prunekit.checkpoint import build_model
from prunekit.criteria import fit_curvature, make_criterion
from prunekit.criteria.capture import capture as _capture
from prunekit.criteria.curvature import default_labels
from prunekit.criteria.fisher import check_labels
from prunekit.data import (
    DataBundle,
    bundle_from_batches,
    check_bundle,
    check_data_fits,
    load_data,
)
from prunekit.errors import SettingError, choice_error, int_setting
from prunekit.finetune import FinetuneSettings, evaluate, finetune
from prunekit.loop import run_pruning
from prunekit.models import EXAMPLES
from prunekit.prune.targets import find_targets
from prunekit.report import data_report, write_run
from prunekit.settings import Progress, PruneResult, PruneSettings
from prunekit.tasks import as_task, base_task
from prunekit.types import LabelKey, Masks, Task, make_task, take_rows


def resolve_data(data, seed: int = 0, val=None) -> DataBundle:
    """A DataBundle from a spec string, a DataBundle, or an iterable of batches.

    Spec strings keep their documented seeded split; batches are split 80/20 at random
    (``seed``) unless ``val`` gives the validation batches (same forms as ``data``).
    """
    if val is not None and isinstance(data, (str, DataBundle)):
        raise SettingError(
            "val= is for data given as batches; a spec string or a DataBundle brings its "
            "own validation split"
        )
    if isinstance(data, DataBundle):
        return check_bundle(data)
    if isinstance(data, str):
        return load_data(data, seed=seed)
    return bundle_from_batches(data, seed=seed, val=val)


def train_example(name: str, seed: int = 0, progress: Progress | None = None):
    """Train the zoo example ``name`` on its bundled data.

    Returns (model, arch spec, data name, validation metrics dict).
    """
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
    return model, ex.arch, ex.data, evaluate(model, task, data.val_batches())


def _settings_from(kwargs: dict) -> PruneSettings:
    known = set(PruneSettings.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SettingError(f"unknown settings {unknown}; valid: {', '.join(sorted(known))}")
    return PruneSettings(**kwargs)


def prune(
    model: nn.Module, data, task: Task | None = None, out=None, val=None, **settings
) -> PruneResult:
    """Python API of `prunekit prune`: prune ``model`` in place.

    data: a spec string ('digits', 'mnist5k', 'synthetic', 'file.npz', 'module:function'),
    a DataBundle, or an iterable of batches ((inputs, targets) pairs or inputs alone;
    tensors or dicts of tensors); val: validation batches in the same forms, for batches
    given as data (None = a random 80/20 split of ``data`` with ``seed``; spec strings
    and DataBundles bring their own split); report['data'] says which (``split``: 'explicit'
    or 'random 80/20 (seed S)', ``train``, ``val``: example counts). task: a Task, or any
    object with forward(model, batch) and loss(outputs, batch) (None = the built-in task
    for the data, or loss='distill'); settings: PruneSettings fields (criterion, sparsity,
    steps, loss, ...); out: optional run directory to write.
    The global torch RNG is seeded with ``seed`` (dropout during fine-tuning must be
    reproducible); save it with ``torch.get_rng_state()`` first if the caller needs it.
    """
    cfg = _settings_from(settings)
    bundle = resolve_data(data, seed=cfg.seed, val=val)
    result = run_pruning(model, bundle, cfg, task=task)
    result.report["data"] = data_report(bundle)
    if out is not None:
        write_run(out, result, None, bundle.name)
    return result


def _scoring_inputs(model, data, task, examples: int | None, include=(), exclude=()):
    """(batches, task, targets) for score and fisher_diagonal.

    Batches given as data are used whole and in order (no validation split); a spec
    string or a DataBundle gives its training split. examples: the first N only (None =
    all of them).
    """
    if examples is not None:
        examples = int_setting(examples, "examples", 1, " (None = all)")
    if isinstance(data, (str, DataBundle)):
        bundle = resolve_data(data)
    else:
        items = list(data)  # one pass over an iterator; val repeats train, never used
        bundle = bundle_from_batches(items, val=items)
    task = base_task("auto", bundle.kind, as_task(task) if task is not None else None)
    check_data_fits(model, bundle, task)
    targets = find_targets(model, tuple(include), tuple(exclude))
    return bundle.first_train(examples or bundle.n_train), task, targets


def score(
    model: nn.Module,
    data,
    criterion: str = "obd",
    task: Task | None = None,
    examples: int | None = None,
    seed: int = 0,
    **settings,
) -> dict[str, torch.Tensor]:
    """Scores (higher = keep) of every target weight; settings are the criterion's fields.

    Every example of ``data`` counts (batches: all, in order; a spec string or DataBundle:
    its training split), or the first ``examples``. Sampled Fisher labels are keyed by
    (seed, step 0, example index): the batching never changes them.
    """
    crit = make_criterion(criterion, **settings)
    batches, task, targets = _scoring_inputs(model, data, task, examples)
    key = LabelKey(seed=seed)
    return crit.evaluate(model, task, targets, batches, generator=key).scores


def fisher_diagonal(
    model: nn.Module,
    data,
    estimator: str = "ekfac",
    labels: str | None = None,
    task: Task | None = None,
    examples: int | None = None,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fisher diagonal of every target weight, shaped like it (float32).

    estimator: 'ekfac', 'kfac' or 'diag' (the structure); labels: 'exact', 'sampled' or
    'empirical' (where the gradient's labels come from; None = the estimator's default).
    The mean runs over every example of ``data`` (batches: all, in order; a spec string or
    DataBundle: its training split), or the first ``examples``; sampled labels are keyed
    by (seed, step 0, example index), so the batching never changes them.
    """
    batches, task, targets = _scoring_inputs(model, data, task, examples)
    labels = labels or default_labels(estimator, task)
    check_labels(labels, task, samples)
    key = LabelKey(seed=seed)
    curvature = fit_curvature(
        estimator, model, task, targets, batches, labels=labels, samples=samples, generator=key
    )
    return curvature.diagonal()


def ntk_alignment(model: nn.Module, inputs, targets, masks: Masks | None = None, **kwargs) -> dict:
    """Tangent-kernel alignment of ``model`` on (inputs, targets) (see prunekit.analysis).

    Returns ``alignment``, ``per_layer`` (name -> float), ``effective_rank`` and ``trace``;
    pruned weights (mask False) are left out of the kernel. Linear layers use the exact
    factored kernel (layer inputs x output gradients, captured by prunekit's hooks).
    """
    kwargs.setdefault("capture", _capture)  # Linear layers through the exact factored form
    return _ntk_alignment(model, inputs, targets, masks=masks, **kwargs)


# prunekit.export (onnx, onnxruntime: ~0.65 s) is imported by the export functions only, so
# `prunekit --help`, `validate` and the pruning loop never load it.


def export_onnx(model: nn.Module, path, example_input, storage: str = "packed", **kwargs) -> dict:
    """Export a pruned model to ONNX, verify it in onnxruntime, return the receipt dict."""
    from prunekit.export import export_onnx as _export_onnx

    return _export_onnx(model, path, example_input, storage=storage, **kwargs)


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
    published_path=None,
) -> dict:
    """Export ``model`` to ONNX at ``path``, verified on the validation split; write export.json.

    The receipt goes to ``receipt_path`` (default: export.json beside the ONNX file) and
    names ``published_path`` when the file is written in a work folder published later.
    """
    from prunekit.export import export_onnx as _export_onnx
    from prunekit.export import exporter_log_path, write_receipt

    path = Path(path)
    x_val = take_rows(data.x_val, slice(0, 512))
    y_val = data.y_val[:512] if data.kind == "classification" else None
    receipt = _export_onnx(
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
    if published_path is not None:  # written in a work folder, published later
        receipt["path"] = str(published_path)
        if receipt.get("exporter_log"):
            receipt["exporter_log"] = str(exporter_log_path(published_path))
    write_receipt(receipt, Path(receipt_path) if receipt_path else path.with_name("export.json"))
    return receipt
