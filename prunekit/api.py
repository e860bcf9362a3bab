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
from prunekit.criteria.curvature import default_labels, output_classes
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
from prunekit.report import write_run
from prunekit.settings import Progress, PruneResult, PruneSettings
from prunekit.tasks import as_task, base_task
from prunekit.types import LabelKey, Masks, Task, batch_inputs, make_task, take_rows


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
    labels = labels or default_labels(estimator, task, output_classes(model, task, batches))
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


def export_forward(data: DataBundle, task=None, loss: str = "auto"):
    """How an export feeds ``model`` the inputs, the way a run of ``task`` does.

    None for no task or a built-in one (a tensor positionally, a dict's entries as keyword
    arguments); else ``forward(model, inputs)`` calling ``task.forward(model, batch)`` with
    the batch built as the run builds it: ``(inputs, None)`` when the data has targets
    (the graph takes the inputs only), the inputs alone when it has none or under
    distillation (loss 'distill', or a DistillationTask: its base task runs the model).
    """
    from prunekit.errors import ModelError, first_line
    from prunekit.tasks import DistillationTask

    if task is None:
        return None
    if isinstance(task, DistillationTask):
        task, loss = task.base, "distill"
    task = as_task(task)
    if type(task).forward is Task.forward:
        return None  # the built-in mapping: export_onnx's default
    labelled = loss != "distill" and data.y_val is not None

    def forward(model: nn.Module, inputs):
        if not labelled:
            return task.forward(model, inputs)
        try:
            return task.forward(model, (inputs, None))
        except Exception as exc:  # a user's forward can fail in any way
            raise ModelError(
                f"the task's forward failed on the batch an export feeds it (inputs, None): "
                f"{first_line(exc)}; the exported graph takes only the batch's inputs, so "
                "forward(model, batch) must not read its targets"
            ) from exc

    return forward


def _export_rows(data: DataBundle) -> tuple:
    """(validation inputs for verification, their class labels or None): the first 512."""
    x_val = take_rows(data.x_val, slice(0, 512))
    return x_val, data.y_val[:512] if data.kind == "classification" else None


def check_export(
    model: nn.Module,
    data: DataBundle,
    storage: str = "packed",
    quantize: str | None = None,
    opset: int | None = None,
    forward=None,
    dynamic_axes=None,
    max_accuracy_drop: float | None = None,
) -> None:
    """Try the export settings before a long run: a quiet dry export of the model as it is
    on 2 validation examples, into a temporary folder that is removed (an int8 export is
    quantized and run, its accuracy limit only checked for form: 2 examples measure none).

    Raises what ``export_model`` would raise for these settings (opset, storage, dynamic
    axes, the exporters, onnxruntime parity at two lengths), before any pruning.
    """
    import logging
    import tempfile

    from prunekit.export import check_accuracy_drop
    from prunekit.export import export_onnx as _export_onnx

    if max_accuracy_drop is not None:
        check_accuracy_drop(max_accuracy_drop)
    x_val, _ = _export_rows(data)
    two = take_rows(x_val, slice(0, 2))
    quiet = logging.getLogger("prunekit.export")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a dense model's size or a fallback: said by the real one
    try:
        with tempfile.TemporaryDirectory(prefix="prunekit-dry-export-") as tmp:
            _export_onnx(
                model, Path(tmp) / "dry.onnx", two, storage=storage, quantize=quantize,
                opset=opset, verify_inputs=two, latency=False, forward=forward,
                dynamic_axes=dynamic_axes, infer_from=x_val,
                max_accuracy_drop=1e9 if quantize else None,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)


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
    forward=None,
    dynamic_axes=None,
    max_accuracy_drop: float | None = None,
    seed: int = 0,
    structure: str = "unstructured",
) -> dict:
    """Export ``model`` to ONNX at ``path``, verified on the validation split; write the
    receipt ``<path>.json`` beside it (``model.onnx`` -> ``model.onnx.json``).

    structure 'units' (a units-pruned model, full shapes with units zeroed): the graph is
    the physically smaller model (``shrink_units``; storage 'packed' becomes 'dense', as
    nothing is left to pack) and the receipt's 'units' section gives the parameters and
    the onnxruntime latency before/after (the unshrunk model exported dense for timing).

    quantize 'int8' / 'int8-dynamic' / 'int8-static' computes in int8 (static calibrated on
    256 training inputs drawn with ``seed``); max_accuracy_drop: points of validation
    accuracy (cosine to fp32 outputs without labels) it may lose (default 1.0), past which
    QuantizationRefused (exit 2) and nothing is written.

    forward: how the model is fed the inputs (``export_forward``; None = the built-in
    mapping); dynamic_axes: ``NAME:DIM`` specs of input axes that may change length (others
    inferred, see prunekit.export.export_onnx). The receipt goes to ``receipt_path``
    (default: beside the ONNX file) and names ``published_path`` when the file is written
    in a work folder published later.
    """
    from prunekit.export import export_onnx as _export_onnx
    from prunekit.export import exporter_log_path, write_receipt
    from prunekit.export import receipt_path as default_receipt

    path = Path(path)
    x_val, y_val = _export_rows(data)
    original = None
    if structure == "units":
        original, model, masks = model, shrink_units(model, data), None
        # int8 compute keeps 'packed': it packs its int8 weights only where that is smaller
        storage = "dense" if storage == "packed" and quantize is None else storage
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
        forward=forward,
        dynamic_axes=dynamic_axes,
        max_accuracy_drop=max_accuracy_drop,
        calibration_inputs=data.x_train,
        seed=seed,
    )
    if original is not None:
        receipt["units"] = _units_receipt(original, model, receipt, data, forward, opset)
    if published_path is not None:  # written in a work folder, published later
        receipt["path"] = str(published_path)
        if receipt.get("exporter_log"):
            receipt["exporter_log"] = str(exporter_log_path(published_path))
    write_receipt(receipt, Path(receipt_path) if receipt_path else default_receipt(path))
    return receipt


def shrink_units(model: nn.Module, data: DataBundle) -> nn.Module:
    """A new, physically smaller copy of a units-pruned ``model``: every unit that nothing
    reads any more (all its readers' entries zero, ``prune.shrink.keep_from_zeros``) is
    deleted; equal in output. Groups are traced on two training examples."""
    from prunekit.prune.shrink import keep_from_zeros, shrink_model
    from prunekit.prune.trace import find_unit_groups

    example = batch_inputs(data.first_train(2)[0])
    groups = find_unit_groups(model, example, find_targets(model))
    return shrink_model(model, groups, keep_from_zeros(model, groups))


def _units_receipt(original, shrunk, receipt: dict, data: DataBundle, forward, opset) -> dict:
    """Parameters before/after and onnxruntime latency of the shrunk graph over the
    unshrunk one exported dense (p50 ms, batch 1 and 64)."""
    import copy
    import tempfile

    from prunekit.export import export_onnx as _export_onnx

    x_val, y_val = _export_rows(data)
    out = {
        "params_before": sum(p.numel() for p in original.parameters()),
        "params_after": sum(p.numel() for p in shrunk.parameters()),
    }
    unshrunk = copy.deepcopy(original)
    with torch.no_grad():  # no exact zeros: the export's dead-unit cleanup would shrink it
        for p in unshrunk.parameters():
            p.masked_fill_(p == 0, 1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        dense = _export_onnx(
            unshrunk, Path(tmp) / "unshrunk.onnx", example_input=take_rows(x_val, slice(0, 8)),
            storage="dense", opset=opset, verify_inputs=x_val, verify_targets=y_val,
            forward=forward,
        )  # fmt: skip
    mine = receipt.get("latency", {}).get(f"onnxruntime_{receipt.get('storage', 'dense')}", {})
    base = dense.get("latency", {}).get("onnxruntime_dense", {})
    for size in ("batch1", "batch64"):
        if size in mine and size in base:
            ratio = mine[size]["p50_ms"] / base[size]["p50_ms"]
            out[f"latency_ratio_{size}"] = round(ratio, 3)
            out[f"unshrunk_p50_ms_{size}"] = base[size]["p50_ms"]
    return out
