"""What every `prunekit` command shares: the typer app, help panels, loading a model, the
data spec of a checkpoint, output checks, torchrun, and what an interrupt reports."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import typer

from prunekit.console import BarProgress, print_note, print_receipt
from prunekit.errors import PrunekitError, RunDirError
from prunekit.trust import check_file_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Prune trained PyTorch models with Taylor/Fisher criteria and export sparse ONNX.",
)

#: The run in progress, for the line an interrupt prints: its bars and how to resume it.
ACTIVE: dict = {"bars": None, "resume": None, "interrupted": None}

CURVATURE = "Criterion and curvature"
SCHEDULE = "Schedule"
FINETUNE = "Fine-tuning"
DATA = "Data and task"
OUTPUTS = "Outputs"
ANALYSIS = "Analysis"
ADVANCED = "Advanced"

TRUST_CODE_HELP = (
    "Let specs read from files (checkpoint metadata, recipes) name code outside prunekit, "
    "which is then imported and called. Without it only prunekit's own models and data are "
    "used from files; specs you type (--arch, --data, --task, --set) are always trusted."
)


def choices(names) -> str:
    return ", ".join(sorted(names))


def example_names() -> list[str]:
    from prunekit.models.examples import EXAMPLES

    return list(EXAMPLES)


def criterion_names():
    from prunekit.settings import criterion_choices

    return criterion_choices()


def estimator_names():
    from prunekit.criteria.curvature import ESTIMATORS

    return ESTIMATORS


def load(model: Path, arch: str | None, trust_pickle: bool):
    from prunekit.checkpoint import load_model

    return load_model(model, arch=arch, trust_pickle=trust_pickle)


def data_spec(typed: str | None, loaded, model: Path) -> str:
    """The data spec: as typed, else the checkpoint's (which may not name code)."""
    if typed:
        return typed
    stored = loaded.metadata.get("prunekit.data")
    if not stored:
        raise PrunekitError("no --data given and the checkpoint names none; e.g. --data digits")
    check_file_spec("data", stored, f"the metadata of {str(model)!r}")
    return stored


def check_export_target(
    path: Path, overwrite: bool, source: Path, option: str = "--export"
) -> None:
    """Refuse an ONNX destination before any work: a folder, the input, a place under a file
    or unwritable, or outputs that exist without --overwrite (the model, its receipt
    ``<path>.json`` and exporter log ``<path>.log``). Missing folders are made later."""
    from prunekit.export import export_outputs
    from prunekit.rundir import check_output_folder

    if path.is_dir():
        raise RunDirError(f"{option} {str(path)!r} is a folder; give an .onnx file path")
    if path.resolve() == source.resolve():
        raise RunDirError(f"{str(path)!r} is the input checkpoint; choose another path")
    check_output_folder(path, option)
    for existing in export_outputs(path):
        if existing.exists() and not overwrite:
            raise RunDirError(f"{str(existing)!r} exists; pass --overwrite or choose another path")


@contextmanager
def distributed(device: str):
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


def export_files(export: Path | None) -> tuple[str, ...]:
    """Files an --export writes besides the run: the model, its receipt, the exporter log."""
    from prunekit.export import export_outputs

    return () if export is None else tuple(str(p) for p in export_outputs(export))


def dynamic_axes(specs: list[str]) -> tuple[tuple[str, int], ...]:
    """--dynamic-axis NAME:DIM values, checked for form (names against the data later)."""
    from prunekit.export import parse_dynamic_axes

    return parse_dynamic_axes(specs)


def check_axes(axes: tuple[tuple[str, int], ...], bundle) -> None:
    """--dynamic-axis NAME and DIM against the data's inputs (one line naming the valid ones)."""
    from prunekit.export.axes import check_asked
    from prunekit.types import take_rows

    check_asked(axes, take_rows(bundle.x_val, slice(0, 2)))


DYNAMIC_AXIS_HELP = (
    "Let axis DIM (>= 1) of graph input NAME change length in the ONNX graph, e.g. "
    "input:1 for audio samples or sequence steps (repeatable). NAME is 'input' for tensor "
    "data, else a key of the data's dict. Axes along which the data's examples are padded "
    "to different lengths are inferred; parity is verified at another length."
)


class _NoteHandler(logging.Handler):
    """Writes each record as one 'note: ...' line (whitespace collapsed) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print_note(" ".join(record.getMessage().split()))
        except Exception:  # a malformed record never ends a command
            self.handleError(record)


@contextmanager
def library_notes():
    """While a command runs, prunekit's library warnings (logging, WARNING and up) show as
    one 'note: ...' line each on stderr, and nowhere else: no logger name, no traceback."""
    logger = logging.getLogger("prunekit")
    handler = _NoteHandler(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def show_receipt(receipt: dict) -> None:
    """Print an export receipt table."""
    from prunekit.export import receipt_table

    rows = receipt_table(receipt)
    units = receipt.get("units")
    if units:  # --structure units: the smaller graph against the unshrunk model
        before, after = units["params_before"], units["params_after"]
        rows.append(("units: parameters", f"{before:,} -> {after:,}"))
        for size in ("batch1", "batch64"):
            ratio = units.get(f"latency_ratio_{size}")
            if ratio is not None:
                rows.append((f"units: latency {size}", f"{ratio:.3f}x the unshrunk model"))
    print_receipt(receipt, rows)


def plots(run_dir: Path) -> list[Path]:
    """Draw the run's plots (matplotlib is imported only here)."""
    from prunekit.analysis import plot_run

    return plot_run(run_dir)


@contextmanager
def tracked_run(bars: BarProgress, resume: str | None):
    """Remember the running job so an interrupt can say how far it got and how to resume.

    typer turns KeyboardInterrupt into exit code 130 before `main` sees it, so the line is
    composed here, while the job's progress is still known, and printed by `main`.
    """
    ACTIVE.update(bars=bars, resume=resume, interrupted=None)
    try:
        yield bars
    except KeyboardInterrupt:
        ACTIVE["interrupted"] = interrupted_line()
        raise
    finally:
        ACTIVE.update(bars=None, resume=None)


def sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C."""
    import signal

    def handler(_signum, _frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)


def interrupted_line() -> str:
    """'interrupted after step k of n; resume with ...' for the run that was stopped."""
    bars, resume = ACTIVE["bars"], ACTIVE["resume"]
    done = getattr(bars, "steps_done", None)
    where = f"after step {done[0]} of {done[1]}" if done else "before the first pruning step"
    if resume:
        return f"interrupted {where}; resume with {resume}"
    if bars is not None:
        return f"interrupted {where}; nothing was written"
    return "interrupted"
