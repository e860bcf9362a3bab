"""The `prunekit` command line (typer). Only this module prints.

User errors (PrunekitError, bad options) print one line `error: ...` on stderr and exit 2;
no traceback, nothing written.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prunekit.errors import PrunekitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Prune trained PyTorch models with Taylor/Fisher criteria and export sparse ONNX.",
)
out_console = Console()
err_console = Console(stderr=True)


class BarProgress:
    """progress(label, done, total) callback drawing one rich bar per label on stderr."""

    def __init__(self, enabled: bool = True):
        self.started = False
        self.bars = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
            disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> BarProgress:
        return self  # the live display starts with the first bar, so early errors stay one line

    def __exit__(self, *exc) -> None:
        if self.started:
            self.bars.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.started:
            self.bars.__enter__()
            self.started = True
        if label not in self.tasks:
            self.tasks[label] = self.bars.add_task(label, total=total)
        task_id = self.tasks[label]
        self.bars.update(task_id, completed=done, total=total)
        if label.startswith("fine-tune") and done >= total:
            self.bars.remove_task(task_id)  # one bar per step would flood the screen
            del self.tasks[label]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _example_names() -> list[str]:
    from prunekit.models.examples import EXAMPLES

    return list(EXAMPLES)


def _choices(names) -> str:
    return ", ".join(sorted(names))


def _summary(report: dict, out: Path) -> None:
    table = Table(title=f"prunekit {report['criterion']} -> {out}")
    extra = [k for k in ("cosine", "agreement") if k in report["metrics"]["dense"]]
    for col in ("model", "loss", "accuracy", *extra):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key, label in (("dense", "dense"), ("pruned", "pruned"), ("finetuned", "fine-tuned")):
        m = report["metrics"][key]
        table.add_row(label, _fmt(m["loss"]), _fmt(m["accuracy"]), *(_fmt(m[k]) for k in extra))
    out_console.print(table)
    sp = report["sparsity"]
    out_console.print(
        f"sparsity {sp['global']:.4f} of {report['params']['prunable']:,} target weights "
        f"({sp['all_parameters']:.4f} of all {report['params']['total']:,}); "
        f"{len(report['steps'])} steps in {report['seconds']:.1f} s"
    )


def _check_export_target(
    path: Path, overwrite: bool, source: Path, receipt: Path | None = None, run_dir=None
) -> None:
    """Refuse an ONNX destination before any work: missing folder, the input, or files
    that exist without --overwrite (the receipt beside it included)."""
    from prunekit.errors import RunDirError

    created_later = run_dir is not None and path.parent.resolve() == Path(run_dir).resolve()
    if not path.parent.is_dir() and not created_later:
        raise RunDirError(f"folder {str(path.parent)!r} of {str(path)!r} does not exist")
    if path.resolve() == source.resolve():
        raise RunDirError(f"{str(path)!r} is the input checkpoint; choose another path")
    for existing in (path, receipt):
        if existing is not None and existing.exists() and not overwrite:
            raise RunDirError(f"{str(existing)!r} exists; pass --overwrite or choose another path")


@contextmanager
def _distributed(device: str):
    """Join the torchrun job described by the environment (gloo on CPU, nccl on CUDA).

    Yields this process's rank (0 outside a job); the group is destroyed on exit.
    """
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _export_files(export: Path | None) -> tuple[str, ...]:
    return () if export is None else (str(export), "export.json")


def _receipt_summary(receipt: dict) -> None:
    from rich.markup import escape

    from prunekit.export import receipt_table

    table = Table(title=f"ONNX export -> {receipt['path']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in receipt_table(receipt):
        table.add_row(escape(key), escape(value))  # "[batch, sequence]" is not markup
    out_console.print(table)


def _plots(run_dir: Path) -> list[Path]:
    from prunekit.analysis import plot_run

    return plot_run(run_dir)


def _load(model: Path, arch: str | None, trust_pickle: bool):
    from prunekit.checkpoint import load_model

    return load_model(model, arch=arch, trust_pickle=trust_pickle)


def _criterion_names():
    from prunekit.criteria import CRITERIA

    return CRITERIA


def _estimator_names():
    from prunekit.criteria.curvature import ESTIMATORS

    return ESTIMATORS


@app.command()
def prune(
    model: Path = typer.Argument(
        ...,
        help="Checkpoint: .safetensors/.pt state_dict, TorchScript archive, "
        "or pickled module (with --trust-pickle).",
    ),
    criterion: str = typer.Option(
        "obd", help=f"Scoring criterion: one of {_choices(_criterion_names())}."
    ),
    sparsity: float = typer.Option(0.9, help="Final fraction of target weights pruned, in [0, 1)."),
    steps: int = typer.Option(10, help="Number of pruning steps (the paper used 1, 14, 140)."),
    schedule: str = typer.Option(
        "exp",
        help="Sparsity schedule: exp (same fraction of the remaining weights "
        "each step), linear or cubic.",
    ),
    fisher: str = typer.Option(
        None,
        help=f"Curvature estimator for obd/qm: one of {_choices(_estimator_names())} "
        "(default: the criterion's).",
    ),
    fisher_labels: str = typer.Option(
        None,
        help="Fisher labels: exact (expectation over the model's classes), "
        "sampled (drawn from the model) or empirical (the data's labels).",
    ),
    fisher_samples: int = typer.Option(
        1, help="Labels drawn per example with --fisher-labels sampled."
    ),
    lam: float = typer.Option(
        0.0,
        "--lambda",
        help="Locality penalty lambda/2*theta^2 added to every score (large = magnitude-like).",
    ),
    scope: str = typer.Option(
        "global", help="global: rank all targets together; layer: same sparsity in every target."
    ),
    data: str = typer.Option(
        None,
        help="Data spec: digits, mnist5k, synthetic, FILE.npz or module:function "
        "(default: the one stored in the checkpoint).",
    ),
    arch: str = typer.Option(
        None, help="Architecture for a state_dict: module:factory[?key=value&...]."
    ),
    task: str = typer.Option(
        None,
        help="User task module:factory: the factory returns an object with forward(model, "
        "batch) and loss(outputs, batch) (optional sample, metrics). Batches are tensors, "
        "dicts of tensors, or (inputs, targets).",
    ),
    loss: str = typer.Option(
        "auto",
        help="Training loss: auto (from the data's labels or --task), classification, "
        "regression, or distill (match the dense model's own outputs; no labels needed).",
    ),
    distill_metric: str = typer.Option(
        "auto",
        help="With --loss distill: kl (logits, at --temperature), mse or cosine (embeddings); "
        "auto = kl when the outputs are logits over the data's classes, else cosine.",
    ),
    temperature: float = typer.Option(
        1.0, help="With --loss distill --distill-metric kl: softmax temperature (> 0)."
    ),
    finetune_epochs: float = typer.Option(
        1.0, help="Fine-tuning epochs after each step (0 = prune all steps first, as in the paper)."
    ),
    final_epochs: float = typer.Option(2.0, help="Epochs of the final fine-tune."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate (SGD, momentum 0.9)."),
    optimizer: str = typer.Option("sgd", help="Fine-tuning optimizer: sgd or adamw."),
    batch_size: int = typer.Option(100, help="Fine-tuning batch size."),
    score_examples: int = typer.Option(
        1000, help="Training examples used to estimate gradients and curvature."
    ),
    score_batch_size: int = typer.Option(
        250,
        help="Examples per scoring batch; lower it for long sequences (curvature passes hold "
        "every target layer's inputs and outputs for one batch).",
    ),
    include: list[str] = typer.Option(
        [], help="Only prune parameters matching this glob (repeatable)."
    ),
    exclude: list[str] = typer.Option(
        [], help="Never prune parameters matching this glob (repeatable)."
    ),
    embeddings: bool = typer.Option(
        False, help="Also prune nn.Embedding weights (scored with the diagonal Fisher)."
    ),
    refit_basis_every: int = typer.Option(
        0,
        help="EKFAC: refit the eigenbasis every N steps (0 = keep the first basis, refit "
        "only the scaling, with pruned weights contributing nothing).",
    ),
    masked_scaling: bool = typer.Option(
        False,
        help="EKFAC: refit the scaling from masked per-example gradients, so pruned weights "
        "contribute nothing (exact; ~100x slower on wide layers). Off: the surviving "
        "weights' diagonal estimates the same F_qq.",
    ),
    recalibrate_bn: bool = typer.Option(
        None,
        "--recalibrate-bn/--no-recalibrate-bn",
        help="Re-estimate BatchNorm running statistics (per time step for BN-LSTM) on training "
        "batches after each pruning step (default: on when the model has BatchNorm).",
    ),
    compensate: bool = typer.Option(
        False,
        help="OBS update of the surviving weights of each layer within every step "
        "(obd/qm/obs on kfac or ekfac); report.json gives the loss before and after.",
    ),
    ntk: bool = typer.Option(
        None,
        "--ntk/--no-ntk",
        help="Log the tangent-kernel alignment on fixed train and "
        "validation probes (default: on when the model has <= 10 outputs and <= 500k target "
        "weights).",
    ),
    ntk_every: str = typer.Option(
        "none",
        help="NTK logging inside fine-tuning: none (only at step boundaries), xM (log-spaced "
        "iterations 5*M^k; x1.15 is the paper's schedule) or N (every N iterations).",
    ),
    export: Path = typer.Option(
        None, help="Also export the pruned model to this ONNX file (packed storage, verified)."
    ),
    out: Path = typer.Option(
        None, help="Run directory (default runs/<model>-<criterion>-<sparsity>)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
    trust_pickle: bool = typer.Option(
        False, help="Allow loading a full pickled module (runs code from the file)."
    ),
    seed: int = typer.Option(0, help="Seed of every random choice (split, sampling, shuffling)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Score, prune in steps with fine-tuning between them, and write a run directory."""
    from prunekit.pipeline import PruneSettings, resolve_data, run_pruning, write_run
    from prunekit.prune.state import check_run_dir

    loaded = _load(model, arch, trust_pickle)
    out = out or Path("runs") / f"{model.stem}-{criterion}-{sparsity:g}"
    check_run_dir(out, overwrite, inputs=(model,), extra_files=_export_files(export))
    if export is not None:
        _check_export_target(export, overwrite, model, run_dir=out)
    data_spec = data or loaded.metadata.get("prunekit.data")
    if not data_spec:
        raise PrunekitError("no --data given and the checkpoint names none; e.g. --data digits")
    settings = PruneSettings(
        criterion=criterion,
        sparsity=sparsity,
        steps=steps,
        schedule=schedule,
        fisher=fisher,
        labels=fisher_labels,
        samples=fisher_samples,
        lam=lam,
        scope=scope,
        score_examples=score_examples,
        score_batch_size=score_batch_size,
        finetune_epochs=finetune_epochs,
        final_epochs=final_epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        include=tuple(include),
        exclude=tuple(exclude),
        seed=seed,
        device=device,
        refit_basis_every=refit_basis_every,
        masked_scaling=masked_scaling,
        recalibrate_bn=recalibrate_bn,
        compensate=compensate,
        ntk=ntk,
        ntk_every=ntk_every,
        loss=loss,
        distill_metric=distill_metric,
        temperature=temperature,
        task_spec=task,
        embeddings=embeddings,
    )
    bundle = resolve_data(data_spec, seed=seed)
    with _distributed(device) as rank, BarProgress(enabled=not quiet and rank == 0) as bars:
        result = run_pruning(loaded.model, bundle, settings, progress=bars)
    if rank != 0:  # under torchrun only rank 0 publishes the run
        return
    write_run(out, result, loaded.arch, data_spec)
    _plots(out)
    _summary(result.report, out)
    if export is not None:
        from prunekit.pipeline import export_model

        receipt = export_model(
            result.model,
            export,
            bundle,
            masks=result.masks,
            overwrite=overwrite,
            receipt_path=out / "export.json",
        )
        _receipt_summary(receipt)


@app.command()
def example(
    name: str = typer.Argument(
        ..., help=f"Example to train: one of {_choices(_example_names())}."
    ),
    out: Path = typer.Option(..., help="Where to write the trained checkpoint (.safetensors)."),
    seed: int = typer.Option(0, help="Seed of initialisation, split and shuffling."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --out."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a zoo model on bundled data and write a checkpoint `prunekit prune` reads."""
    from prunekit.checkpoint import ARCH_KEY
    from prunekit.errors import RunDirError
    from prunekit.models import EXAMPLES
    from prunekit.pipeline import train_example
    from prunekit.prune.state import save_tensors

    if name not in EXAMPLES:
        from prunekit.errors import choice_error

        raise choice_error("example", name, EXAMPLES)
    if out.suffix != ".safetensors":
        raise RunDirError(f"--out {str(out)!r} must end in .safetensors")
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {str(out)!r} exists; pass --overwrite or choose another path")
    with BarProgress(enabled=not quiet) as bars:
        model, arch, data_name, metrics = train_example(name, seed=seed, progress=bars)
    meta = {
        ARCH_KEY: arch,
        "prunekit.data": data_name,
        "prunekit.example": name,
        "prunekit.accuracy": f"{metrics['accuracy']:.4f}",
    }
    save_tensors(out, model.state_dict(), meta)
    out_console.print(
        f"trained {name} ({EXAMPLES[name].description}): validation loss "
        f"{metrics['loss']:.4f}, accuracy {_fmt(metrics['accuracy'])} -> {out}"
    )


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A run directory written by prunekit prune.")):
    """Draw loss/accuracy, sparsity and NTK alignment curves into RUN_DIR/plots/."""
    for path in _plots(run_dir):
        out_console.print(str(path))


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="Pruned checkpoint (e.g. RUN_DIR/model.safetensors)."
    ),
    out: Path = typer.Option(..., help="ONNX file to write; export.json is written beside it."),
    storage: str = typer.Option(
        "packed",
        help="dense, sparse (SparseTensorProto) or packed (uint8 index deltas + "
        "values, decoded in-graph and constant-folded by onnxruntime).",
    ),
    quantize: str = typer.Option(None, help="int8: packed values as int8 with per-row scales."),
    opset: int = typer.Option(None, help="ONNX opset (default 18)."),
    data: str = typer.Option(
        None, help="Data spec for the parity check (default: the one stored in the checkpoint)."
    ),
    arch: str = typer.Option(None, help="Architecture for a state_dict: module:factory[?k=v]."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --out."),
    trust_pickle: bool = typer.Option(False, help="Allow loading a full pickled module."),
) -> None:
    """Export a pruned model to ONNX, verify parity in onnxruntime, and print the receipt."""
    from prunekit.data import check_data_fits
    from prunekit.export import check_modes
    from prunekit.pipeline import export_model, resolve_data

    check_modes(storage, quantize)
    loaded = _load(checkpoint, arch, trust_pickle)
    _check_export_target(out, overwrite, checkpoint, receipt=out.with_name("export.json"))
    data_spec = data or loaded.metadata.get("prunekit.data")
    if not data_spec:
        raise PrunekitError("no --data given and the checkpoint names none; e.g. --data digits")
    bundle = resolve_data(data_spec)
    check_data_fits(loaded.model, bundle)
    receipt = export_model(
        loaded.model,
        out,
        bundle,
        storage=storage,
        quantize=quantize,
        opset=opset,
        overwrite=overwrite,
    )
    _receipt_summary(receipt)


def _checks_table(checks: list[dict]) -> bool:
    table = Table(title="checks")
    for col in ("check", "limit", "value", "result"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for row in checks:
        table.add_row(
            row["check"],
            _fmt(row["limit"]),
            _fmt(row["value"]),
            "pass" if row["passed"] else "FAIL",
        )
    if checks:
        out_console.print(table)
    return all(row["passed"] for row in checks)


def _sigterm_as_interrupt() -> None:
    import signal

    def handler(_signum, _frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: section.key=value (repeatable, type-checked)."
    ),
    out: Path = typer.Option(None, help="Run directory (default runs/<recipe name>)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last step."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Run a compression recipe; exit 0 when every check passes, 1 when one fails."""
    from prunekit.pipeline import load_checked_recipe, run_recipe
    from prunekit.prune.state import check_run_dir, load_step_state

    spec = load_checked_recipe(recipe, set_)
    out = out or Path("runs") / recipe.stem
    inputs = (recipe, *([Path(spec["model"]["checkpoint"])] if spec["model"]["checkpoint"] else []))
    extra = ("model.onnx", "export.json")
    if not resume or load_step_state(out) is None:  # nothing to resume: a fresh run
        check_run_dir(out, overwrite, inputs=inputs, extra_files=extra)
    else:  # resuming may rewrite every run file: still never the inputs
        check_run_dir(out, True, inputs=inputs, extra_files=extra)
    _sigterm_as_interrupt()
    with BarProgress(enabled=not quiet) as bars:
        report, checks = run_recipe(spec, out, resume=resume, progress=bars)
    _plots(out)
    _summary(report, out)
    if not _checks_table(checks):
        raise typer.Exit(1)


@app.command()
def validate(
    recipes: list[Path] = typer.Argument(..., help="Recipe YAML files."),
) -> None:
    """Check recipes against the schema and resolve their targets (no data, no compute)."""
    from prunekit.pipeline import load_checked_recipe, validate_recipe

    for path in recipes:
        checked = validate_recipe(load_checked_recipe(path))
        targets = checked["targets"]
        what = (
            f"{len(targets)} targets, {sum(targets.values()):,} weights"
            if targets is not None
            else "targets resolved when the model loads"
        )
        out_console.print(f"ok {path}: {len(checked['steps'])} steps, {what}")


@app.command()
def explain(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: section.key=value."),
) -> None:
    """Print a recipe's step timeline and estimated passes, without training or scoring."""
    from prunekit.pipeline import explain_recipe, load_checked_recipe

    plan = explain_recipe(load_checked_recipe(recipe, set_))
    table = Table(title=f"timeline of {recipe}")
    cols = (
        "step",
        "sparsity",
        "kept",
        "per layer",
        "FT epochs",
        "score fwd",
        "score bwd",
        "FT fwd+bwd",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for r in plan["rows"]:
        table.add_row(
            str(r["step"]),
            f"{r['sparsity']:.4f}",
            _fmt(r["kept"]),
            _fmt(r["per_layer"]),
            f"{r['finetune_epochs']:g}",
            f"{r['score_forward']:,}",
            f"{r['score_backward']:,}",
            f"{r['finetune_forward']:,.0f}",
        )
    out_console.print(table)
    t = plan["totals"]
    out_console.print(
        f"total example-passes: scoring {t['score_forward']:,} fwd / {t['score_backward']:,} "
        f"bwd; fine-tuning {t['finetune_forward']:,.0f} fwd+bwd (final fine-tune included)"
    )
    for note in plan["notes"]:
        out_console.print(f"note: {note}")


def _print_error(message: str) -> None:
    one_line = " ".join(message.split())
    err_console.print(f"error: {one_line}", highlight=False, soft_wrap=True, markup=False)


def _usage_message(exc, argv: list[str]) -> str:
    """typer's message, plus the value the user gave when typer does not quote it."""
    message = exc.format_message()
    param = getattr(exc, "param", None)
    for opt in getattr(param, "opts", ()) or ():
        for i, token in enumerate(argv):
            value = None
            if token == opt and i + 1 < len(argv):
                value = argv[i + 1]
            elif token.startswith(opt + "="):
                value = token.split("=", 1)[1]
            if value is not None and repr(value) not in message:
                return f"{message} (got {value!r})"
    return message


def _importable_cwd() -> None:
    """Let --arch/--task/--data module:name specs import modules from the working folder,
    as ``python -m`` would (appended, so installed packages are never shadowed)."""
    import os

    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning user errors into one line and exit 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _importable_cwd()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="prunekit")
    except typer.TyperException as exc:  # bad options: typer's usage errors, one line
        _print_error(_usage_message(exc, sys.argv[1:] if argv is None else argv))
        code = 2
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted", highlight=False)
        code = 130
    except PrunekitError as exc:
        _print_error(str(exc))
        code = exc.exit_code
    code = code if isinstance(code, int) else 0
    if argv is None:
        sys.exit(code)
    return code
