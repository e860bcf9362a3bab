"""`prunekit example`, `prunekit plot` and `prunekit export`."""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli_common import (
    DYNAMIC_AXIS_HELP,
    TRUST_CODE_HELP,
    app,
    check_axes,
    check_export_target,
    choices,
    data_spec,
    dynamic_axes,
    example_names,
    library_notes,
    load,
    plots,
    show_receipt,
    tracked_run,
)
from prunekit.console import BarProgress, fmt, out_console
from prunekit.errors import RunDirError
from prunekit.limits import check_bounds
from prunekit.trust import trusting_code


@app.command()
def example(
    name: str = typer.Argument(..., help=f"Example to train: one of {choices(example_names())}."),
    out: Path = typer.Option(
        ..., help="Where to write the trained checkpoint (.safetensors; missing folders are made)."
    ),
    seed: int = typer.Option(0, help="Seed of initialisation, split and shuffling (0 to 2**63-1)."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --out."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a zoo model on bundled data and write a checkpoint `prunekit prune` reads."""
    from prunekit.api import train_example
    from prunekit.checkpoint import ARCH_KEY
    from prunekit.models import EXAMPLES
    from prunekit.prune.state import save_tensors
    from prunekit.rundir import check_output_folder, output_folders

    if name not in EXAMPLES:
        from prunekit.errors import choice_error

        raise choice_error("example", name, EXAMPLES)
    check_bounds({"seed": seed}, {"seed": "--seed"})
    if out.suffix != ".safetensors":
        raise RunDirError(f"--out {str(out)!r} must end in .safetensors")
    if out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a folder; give a .safetensors file path")
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {str(out)!r} exists; pass --overwrite or choose another path")
    check_output_folder(out, "--out")  # under a file or unwritable: now, not after training
    with BarProgress(enabled=not quiet) as bars, tracked_run(bars, None), library_notes():
        model, arch, data_name, metrics = train_example(name, seed=seed, progress=bars)
    meta = {
        ARCH_KEY: arch,
        "prunekit.data": data_name,
        "prunekit.example": name,
        "prunekit.accuracy": f"{metrics['accuracy']:.4f}",
    }
    with output_folders(out, "--out"):  # made only now; removed again if the write fails
        save_tensors(out, model.state_dict(), meta)
    out_console.print(
        f"trained {name} ({EXAMPLES[name].description}): validation loss "
        f"{metrics['loss']:.4f}, accuracy {fmt(metrics['accuracy'])} -> {out}"
    )


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A run directory written by prunekit prune.")):
    """Draw loss/accuracy, sparsity and NTK alignment curves into RUN_DIR/plots/."""
    for path in plots(run_dir):
        out_console.print(str(path))


QUANTIZE_HELP = (
    "int8: int8 compute in onnxruntime (dynamic: MatMul/Gemm in int8, activations scaled at "
    "run time; convolutions stay fp32, the faster choice measured); int8-dynamic: the same; "
    "int8-static: QDQ calibrated on 256 training inputs, convolutions too; int8-weights: "
    "storage only (int8 values decoded to fp32: smaller file, same latency). Verified "
    "against the fp32 graph; the receipt gives both latencies and accuracies."
)
MAX_ACCURACY_DROP_HELP = (
    "With an int8 --quantize: refuse to write the file (exit 2) if validation accuracy drops "
    "more than this many points vs the fp32 graph (100 x (1 - cosine) for a model without "
    "labels); default 1.0 for int8 compute, no limit for int8-weights."
)


def check_quantize_options(storage: str, quantize, opset, max_accuracy_drop) -> None:
    """Storage/quantize/opset (export.check_modes) and --max-accuracy-drop (a finite number
    >= 0, only with --quantize), one line each; onnx is not loaded."""
    from prunekit.errors import SettingError
    from prunekit.export import check_accuracy_drop, check_modes

    check_modes(storage, quantize, opset)
    if max_accuracy_drop is not None:
        check_accuracy_drop(max_accuracy_drop)
        if quantize is None:
            raise SettingError(
                f"--max-accuracy-drop {max_accuracy_drop:g} does nothing without an int8 "
                "--quantize (int8, int8-dynamic, int8-static, int8-weights)"
            )


def check_prune_quantize(options: dict) -> None:
    """prune's --quantize and --max-accuracy-drop: valid (check_quantize_options, with the
    packed storage --export writes) and only with --export; one line each."""
    from prunekit.errors import SettingError

    quantize, drop = options["quantize"], options["max_accuracy_drop"]
    if options["export"] is None and (quantize is not None or drop is not None):
        flag = "--quantize" if quantize is not None else "--max-accuracy-drop"
        raise SettingError(f"{flag} needs --export PATH.onnx (it sets how the export is written)")
    check_quantize_options("packed", quantize, None, drop)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="Pruned checkpoint (e.g. RUN_DIR/model.safetensors)."
    ),
    out: Path = typer.Option(
        ...,
        help="ONNX file to write (missing folders are made); its receipt is OUT.json beside "
        "it (model.onnx -> model.onnx.json).",
    ),
    storage: str = typer.Option(
        "packed",
        help="dense, sparse (SparseTensorProto) or packed (uint8 index deltas + "
        "values, decoded in-graph and constant-folded by onnxruntime).",
    ),
    quantize: str = typer.Option(None, help=QUANTIZE_HELP),
    max_accuracy_drop: float = typer.Option(None, help=MAX_ACCURACY_DROP_HELP),
    opset: int = typer.Option(
        None, help="ONNX opset: default 18; valid 7..23 (packed/sparse need >= 11, int8* >= 13)."
    ),
    dynamic_axis: list[str] = typer.Option(
        [], "--dynamic-axis", metavar="NAME:DIM", help=DYNAMIC_AXIS_HELP
    ),
    data: str = typer.Option(
        None, help="Data spec for the parity check (default: the one stored in the checkpoint)."
    ),
    task: str = typer.Option(
        None,
        help="User task module:factory whose forward(model, batch) feeds the model (as in "
        "prune --task); the graph takes the batch's input tensors.",
    ),
    arch: str = typer.Option(None, help="Architecture for a state_dict: module:factory[?k=v]."),
    overwrite: bool = typer.Option(False, help="Replace an existing file at --out."),
    trust_pickle: bool = typer.Option(False, help="Allow loading a full pickled module."),
    trust_code: bool = typer.Option(False, help=TRUST_CODE_HELP),
) -> None:
    """Export a pruned model to ONNX, verify parity in onnxruntime, and print the receipt."""
    from prunekit.api import export_forward, export_model, resolve_data
    from prunekit.data import check_data_fits
    from prunekit.rundir import output_folders
    from prunekit.tasks import load_task

    check_quantize_options(storage, quantize, opset, max_accuracy_drop)
    axes = dynamic_axes(dynamic_axis)
    with trusting_code(trust_code), library_notes():
        loaded = load(checkpoint, arch, trust_pickle)
        structure = stored_structure(loaded.metadata, checkpoint)
        check_export_target(out, overwrite, checkpoint, "--out")
        bundle = resolve_data(data_spec(data, loaded, checkpoint))
        user = load_task(task) if task else None
        check_data_fits(loaded.model, bundle, user, loss=False)  # its forward, on 2 examples
        check_axes(axes, bundle)  # NAME and DIM against the data, before any folder is made
        with output_folders(out, "--out"):  # made now, removed again if the export fails
            receipt = export_model(
                loaded.model, out, bundle, storage=storage, quantize=quantize, opset=opset,
                overwrite=overwrite, forward=export_forward(bundle, user), dynamic_axes=axes,
                max_accuracy_drop=max_accuracy_drop,
                structure=structure,
            )  # fmt: skip
    show_receipt(receipt)


def stored_structure(metadata: dict, path: Path) -> str:
    """The checkpoint's ``prunekit.structure`` metadata ('unstructured' when absent): read
    from a file, so only a known value passes; anything else is one CheckpointError line."""
    from prunekit.errors import CheckpointError
    from prunekit.settings import STRUCTURES

    value = metadata.get("prunekit.structure", "unstructured")
    if value not in STRUCTURES:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise CheckpointError(
            f"{path}: metadata prunekit.structure {shown!r} is not one of {', '.join(STRUCTURES)}"
        )
    return value
