"""`prunekit prune`: the main command; options grouped into help panels."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from prunekit.cli_common import (
    ADVANCED,
    ANALYSIS,
    CURVATURE,
    DATA,
    DYNAMIC_AXIS_HELP,
    FINETUNE,
    OUTPUTS,
    SCHEDULE,
    TRUST_CODE_HELP,
    app,
    check_export_target,
    choices,
    criterion_names,
    data_spec,
    distributed,
    dynamic_axes,
    estimator_names,
    export_files,
    library_notes,
    load,
    plots,
    show_receipt,
    sigterm_as_interrupt,
    tracked_run,
)
from prunekit.cli_tools import MAX_ACCURACY_DROP_HELP, QUANTIZE_HELP, check_prune_quantize
from prunekit.console import BarProgress, print_summary
from prunekit.limits import check_bounds
from prunekit.trust import trusting_code


@app.command()
def prune(
    model: Path = typer.Argument(
        ...,
        help="Checkpoint: .safetensors/.pt state_dict, TorchScript archive, "
        "or pickled module (with --trust-pickle).",
    ),
    criterion: str = typer.Option(
        "auto",
        help=f"Scoring criterion: one of {choices(criterion_names())}. 'auto' (default): obs "
        "with the rows update (`--update auto`) up to 95% sparsity in a run that fine-tunes, "
        "else obd; report.json 'criterion' says which ran.",
    ),
    sparsity: float = typer.Option(0.9, help="Final fraction of target weights pruned, in [0, 1)."),
    steps: int = typer.Option(10, help="Number of pruning steps (the paper used 1, 14, 140)."),
    data: str = typer.Option(
        None,
        help="Data spec: digits, mnist5k, synthetic, FILE.npz or module:function "
        "(default: the one stored in the checkpoint).",
    ),
    out: Path = typer.Option(
        None, help="Run directory (default runs/<model>-<criterion>-<sparsity>)."
    ),
    export: Path = typer.Option(
        None,
        help="Also export the pruned model to this ONNX file (packed storage, verified; its "
        "receipt is FILE.json beside it, missing folders are made). Checked by a dry export "
        "before pruning.",
    ),
    dynamic_axis: list[str] = typer.Option(
        [], "--dynamic-axis", metavar="NAME:DIM", help=DYNAMIC_AXIS_HELP, rich_help_panel=OUTPUTS
    ),
    quantize: str = typer.Option(
        None, help="With --export: " + QUANTIZE_HELP, rich_help_panel=OUTPUTS
    ),
    max_accuracy_drop: float = typer.Option(
        None,
        help=MAX_ACCURACY_DROP_HELP + " A refused file is not written; the run directory is, "
        "and prune exits 2.",
        rich_help_panel=OUTPUTS,
    ),
    fisher: str = typer.Option(
        None,
        help=f"Curvature estimator for obd/qm: one of {choices(estimator_names())} "
        "(default: the criterion's).",
        rich_help_panel=CURVATURE,
    ),
    fisher_labels: str = typer.Option(
        None,
        help="Fisher labels: exact (expectation over the model's classes), "
        "sampled (drawn from the model) or empirical (the data's labels).",
        rich_help_panel=CURVATURE,
    ),
    fisher_samples: int = typer.Option(
        1, help="Labels drawn per example with --fisher-labels sampled.", rich_help_panel=CURVATURE
    ),
    lam: float = typer.Option(
        0.0,
        "--lambda",
        help="Locality penalty lambda/2*theta^2 added to every score (large = magnitude-like).",
        rich_help_panel=CURVATURE,
    ),
    scope: str = typer.Option(
        "global",
        help="global: rank all targets together; layer: same sparsity in every target.",
        rich_help_panel=CURVATURE,
    ),
    update: str = typer.Option(
        "auto",
        help="What the surviving weights of a layer get when weights are removed (obd/qm/obs "
        "on kfac or ekfac): auto (rows with --criterion auto when it picks obs, and when the "
        "run fine-tunes nowhere, i.e. --finetune-epochs 0 --final-epochs 0; else none); "
        "none; summed (single-weight OBS "
        "updates added up); joint (the "
        "exact OBS update for all removed weights at once, correlations included, both "
        "Kronecker factors, conjugate gradients: slow); rows (the same per output row against "
        "the layer's inputs only, as SparseGPT: ~2x a plain run). joint and rows choose "
        "their damping per layer on validation examples (never trained on). report.json gives "
        "the loss "
        "before and after.",
        rich_help_panel=CURVATURE,
    ),
    compensate: bool = typer.Option(
        False, help="Same as --update summed (kept for older scripts).", rich_help_panel=CURVATURE
    ),
    shots: int = typer.Option(
        0,
        help="Curvature re-estimations per pruning step: the step's weights are removed in "
        "this many equal slices, scored again before each (locality inside the step). "
        "0 = auto: 1, except in a run with the rows update and no fine-tuning anywhere, "
        "where ceil(10 / steps) (at least 10 re-estimations in all: one step at 95% on the "
        "bench MLP 88.8% with 10 shots, 81.6% with 1, magnitude 83.5%).",
        rich_help_panel=CURVATURE,
    ),
    structure: str = typer.Option(
        "unstructured",
        help="unstructured: single weights; units: whole neurons, conv channels, recurrent "
        "hidden units, attention heads and FFN units (then --sparsity is the fraction of units "
        "removed and the exported model is physically smaller).",
        rich_help_panel=SCHEDULE,
    ),
    score_examples: int = typer.Option(
        1000,
        help="Training examples used to estimate gradients and curvature.",
        rich_help_panel=CURVATURE,
    ),
    schedule: str = typer.Option(
        "exp",
        help="Sparsity schedule: exp (same fraction of the remaining weights "
        "each step), linear or cubic.",
        rich_help_panel=SCHEDULE,
    ),
    include: list[str] = typer.Option(
        [], help="Only prune parameters matching this glob (repeatable).", rich_help_panel=SCHEDULE
    ),
    exclude: list[str] = typer.Option(
        [], help="Never prune parameters matching this glob (repeatable).", rich_help_panel=SCHEDULE
    ),
    embeddings: bool = typer.Option(
        False,
        help="Also prune nn.Embedding weights (scored with the diagonal Fisher).",
        rich_help_panel=SCHEDULE,
    ),
    finetune_epochs: float = typer.Option(
        1.0,
        help="Fine-tuning epochs after each step (0 = prune all steps first, as in the paper).",
        rich_help_panel=FINETUNE,
    ),
    final_epochs: float = typer.Option(
        2.0, help="Epochs of the final fine-tune.", rich_help_panel=FINETUNE
    ),
    lr: str = typer.Option(
        "auto",
        help="Fine-tuning learning rate (SGD, momentum 0.9): a number, or auto = at the first "
        "fine-tune, train 20 steps at each of 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 from the same weights "
        "and keep the largest rate within 1% of the lowest validation loss (report.json "
        "finetune.lr, finetune.lr_probe). Every phase hands back its best weights on validation.",
        rich_help_panel=FINETUNE,
    ),
    optimizer: str = typer.Option(
        "sgd", help="Fine-tuning optimizer: sgd or adamw.", rich_help_panel=FINETUNE
    ),
    lr_schedule: str = typer.Option(
        "constant",
        help="Rate within each fine-tuning phase: constant, or cosine (every phase restarts "
        "at the rate and decays to 0).",
        rich_help_panel=FINETUNE,
    ),
    distill_weight: float = typer.Option(
        0.0,
        help="Fine-tune on (1-w) x the task loss + w x distillation to the dense model's "
        "outputs (KL at --temperature for classifiers), w in [0, 1]; 0 = the task loss alone.",
        rich_help_panel=FINETUNE,
    ),
    batch_size: int = typer.Option(100, help="Fine-tuning batch size.", rich_help_panel=FINETUNE),
    recalibrate_bn: bool = typer.Option(
        None,
        "--recalibrate-bn/--no-recalibrate-bn",
        help="Re-estimate BatchNorm running statistics (per time step for BN-LSTM) on training "
        "batches after each pruning step (default: on when the model has BatchNorm).",
        rich_help_panel=FINETUNE,
    ),
    arch: str = typer.Option(
        None,
        help="Architecture for a state_dict: module:factory[?key=value&...].",
        rich_help_panel=DATA,
    ),
    task: str = typer.Option(
        None,
        help="User task module:factory; the factory returns an object with forward(model, "
        "batch) and loss(outputs, batch) (optional sample, metrics). Batches are tensors, "
        "dicts of tensors, or (inputs, targets).",
        rich_help_panel=DATA,
    ),
    loss: str = typer.Option(
        "auto",
        help="Training loss: auto (from the data's labels or --task), classification, "
        "regression, or distill (match the dense model's own outputs; no labels needed).",
        rich_help_panel=DATA,
    ),
    distill_metric: str = typer.Option(
        "auto",
        help="With --loss distill: kl (logits, at --temperature), mse or cosine (embeddings); "
        "auto = kl when the outputs are logits over the data's classes, else cosine.",
        rich_help_panel=DATA,
    ),
    temperature: float = typer.Option(
        1.0,
        help="With --loss distill --distill-metric kl: softmax temperature (> 0).",
        rich_help_panel=DATA,
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an earlier run in --out.", rich_help_panel=OUTPUTS
    ),
    quiet: bool = typer.Option(False, help="No progress bars.", rich_help_panel=OUTPUTS),
    ntk: bool = typer.Option(
        None,
        "--ntk/--no-ntk",
        help="Log the tangent-kernel alignment on fixed train and "
        "validation probes (default: on when the model has <= 10 outputs and <= 500k target "
        "weights).",
        rich_help_panel=ANALYSIS,
    ),
    ntk_every: str = typer.Option(
        "none",
        help="NTK logging inside fine-tuning: none (only at step boundaries), xM (log-spaced "
        "iterations 5*M^k; x1.15 is the paper's schedule) or N (every N iterations).",
        rich_help_panel=ANALYSIS,
    ),
    score_batch_size: int = typer.Option(
        250,
        help="Examples per scoring batch; lower it for long sequences (curvature passes hold "
        "every target layer's inputs and outputs for one batch).",
        rich_help_panel=ADVANCED,
    ),
    refit_basis_every: int = typer.Option(
        0,
        help="EKFAC: refit the eigenbasis every N steps (0 = keep the first basis, refit "
        "only the scaling, with pruned weights contributing nothing).",
        rich_help_panel=ADVANCED,
    ),
    refit_basis_below: float = typer.Option(
        0.5,
        help="EKFAC: also refit the eigenbasis once the kept fraction of target weights has "
        "fallen to this fraction of its value at the last fit (0 = off). 0.5 refits at "
        "steps 1, 5 and 9 of 10 to 90%: the digits MLP 94.9% vs 93.8% with the first "
        "basis kept (8 seeds).",
        rich_help_panel=ADVANCED,
    ),
    masked_scaling: bool = typer.Option(
        False,
        help="EKFAC: refit the scaling from masked per-example gradients, so pruned weights "
        "contribute nothing (exact; ~100x slower on wide layers). Off: the surviving "
        "weights' diagonal estimates the same F_qq.",
        rich_help_panel=ADVANCED,
    ),
    seed: int = typer.Option(
        0,
        help="Seed of every random choice (split, sampling, shuffling), 0 to 2**63-1.",
        rich_help_panel=ADVANCED,
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or auto.", rich_help_panel=ADVANCED),
    trust_pickle: bool = typer.Option(
        False,
        help="Allow loading a full pickled module (runs code from the file).",
        rich_help_panel=ADVANCED,
    ),
    trust_code: bool = typer.Option(False, help=TRUST_CODE_HELP, rich_help_panel=ADVANCED),
) -> None:
    """Score, prune in steps with fine-tuning between them, and write a run directory.

    The first options are the ones that matter most; the panels below group the rest.
    """
    options = dict(locals())  # first: exactly the command's options
    from prunekit.settings import PruneSettings, lr_setting

    options["lr"] = lr_setting(options["lr"], "--lr")  # 'auto' or a finite number > 0
    check_bounds(options, {k: "--" + k.replace("_", "-") for k in options} | {"lam": "--lambda"})
    check_bounds({"samples": fisher_samples}, {"samples": "--fisher-samples"})
    options["dynamic_axis"] = dynamic_axes(dynamic_axis)  # the form, before any loading
    check_prune_quantize(options)  # --quantize/--max-accuracy-drop: with --export, valid
    with trusting_code(trust_code), library_notes():
        loaded = load(model, arch, trust_pickle)
        out = out or Path("runs") / f"{model.stem}-{criterion}-{sparsity:g}"
        settings = PruneSettings(**_settings_options(options))
        _prune_into(loaded, model, out, settings, options)


_NOT_SETTINGS = (
    "model", "data", "out", "export", "dynamic_axis", "arch", "overwrite", "quiet", "trust_pickle",
    "quantize", "max_accuracy_drop",
)  # fmt: skip
_RENAMED = {"fisher_labels": "labels", "fisher_samples": "samples", "task": "task_spec"}


def _settings_options(options: dict) -> dict:
    """PruneSettings keyword arguments from the prune command's options."""
    skip = (*_NOT_SETTINGS, "trust_code")
    settings = {_RENAMED.get(k, k): v for k, v in options.items() if k not in skip}
    return {**settings, "include": tuple(options["include"]), "exclude": tuple(options["exclude"])}


def _prune_into(loaded, model: Path, out: Path, settings, options: dict) -> None:
    """Check every output, run the pruning, then write the run, plots, summary and export.

    The run is written into a locked work folder and published as ``out`` at once; an
    ``--export`` file inside ``out`` is written with it, one elsewhere after it.
    """
    from prunekit.api import resolve_data
    from prunekit.loop import run_pruning
    from prunekit.rundir import preflight, run_directory

    export, overwrite = options["export"], options["overwrite"]
    extra = export_files(export)
    preflight(out, overwrite=overwrite, inputs=(model,), extra_files=extra)
    if export is not None:
        check_export_target(export, overwrite, model)
    data_name = data_spec(options["data"], loaded, model)
    bundle = resolve_data(data_name, seed=settings.seed)
    plan = None
    if export is not None:  # the export's settings are tried now, never after the run
        plan = _export_plan(loaded.model, bundle, settings, options)
    sigterm_as_interrupt()
    with distributed(settings.device) as rank:
        owned = nullcontext(None)
        if rank == 0:  # under torchrun only rank 0 writes and publishes the run
            owned = run_directory(out, overwrite=overwrite, inputs=(model,), extra_files=extra)
        bars = BarProgress(enabled=not options["quiet"] and rank == 0)
        with owned as work, tracked_run(bars, None), bars:
            result = run_pruning(loaded.model, bundle, settings, progress=bars)
            if work is not None:
                receipt = _write_outputs(work, out, result, loaded.arch, data_name, bundle, plan)
    if rank != 0:
        return
    print_summary(result.report, out)
    if plan is not None and plan.get("refused"):  # the run is written; the ONNX file is not
        raise plan["refused"]
    if export is not None and export.resolve().parent != out.resolve():
        from prunekit.rundir import output_folders

        with output_folders(export, "--export"):  # made now, removed if the export fails
            receipt = _export(result, export, bundle, plan, overwrite)
    if receipt is not None:
        show_receipt(receipt)


def _export_plan(model, bundle, settings, options: dict) -> dict:
    """How --export feeds the model (the task's argument mapping) and its axes, tried by
    a dry export of the dense model on 2 examples now, before any pruning."""
    from prunekit.api import check_export, export_forward
    from prunekit.tasks import load_task

    task = load_task(settings.task_spec) if settings.task_spec else None
    plan = {
        "export": options["export"],
        "forward": export_forward(bundle, task, settings.loss),
        "dynamic_axes": options["dynamic_axis"],
        "quantize": options["quantize"],
        "max_accuracy_drop": options["max_accuracy_drop"],
        "seed": settings.seed,
    }
    check_export(
        model, bundle, forward=plan["forward"], dynamic_axes=plan["dynamic_axes"],
        quantize=plan["quantize"], max_accuracy_drop=plan["max_accuracy_drop"],
    )  # fmt: skip
    return plan


def _write_outputs(work: Path, out: Path, result, arch, data_name: str, bundle, plan):
    """The run files, plots, and an export that lives inside the run folder; its receipt."""
    from prunekit.report import write_run

    write_run(work, result, arch, data_name)
    plots(work)
    if plan is None or plan["export"].resolve().parent != out.resolve():
        return None
    return _export(result, work / plan["export"].name, bundle, plan, True)


def _export(result, path: Path, bundle, plan: dict, overwrite: bool):
    """Export the pruned model to ``path`` with its receipt beside it; the receipt names
    the --export path (the file's final place when ``path`` is in the work folder). An int8
    file refused for its accuracy drop inside the work folder is kept in ``plan['refused']``
    (raised once the run directory is published); elsewhere it is raised at once."""
    from prunekit.api import export_model
    from prunekit.export import QuantizationRefused

    try:
        return export_model(
            result.model, path, bundle, masks=result.masks, overwrite=overwrite,
            published_path=plan["export"], forward=plan["forward"],
            dynamic_axes=plan["dynamic_axes"], quantize=plan.get("quantize"),
            max_accuracy_drop=plan.get("max_accuracy_drop"), seed=plan.get("seed", 0),
            structure="units" if "units" in result.report else "unstructured",
        )  # fmt: skip
    except QuantizationRefused as exc:
        if path == plan["export"]:
            raise
        plan["refused"] = exc
        return None
