"""`prunekit run`, `prunekit validate` and `prunekit explain`: the recipe commands.

A recipe is data: before anything is imported, the code it names (model.arch, data,
task.spec, its checkpoint's stored arch) must be prunekit's own, typed with --set, or
allowed with --trust-code.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from prunekit.cli_common import (
    TRUST_CODE_HELP,
    app,
    library_notes,
    plots,
    sigterm_as_interrupt,
    tracked_run,
)
from prunekit.console import (
    BarProgress,
    out_console,
    print_checks,
    print_note,
    print_summary,
    print_timeline,
)
from prunekit.trust import check_recipe_trust, trusting_code

RECIPE_OUTPUTS = ("model.onnx", "model.onnx.json", "model.onnx.log")
SET_HELP = "Override a recipe key: section.key=value (repeatable, type-checked; trusted as typed)."


def _checked(recipe: Path, overrides: list[str], trust_code: bool) -> dict:
    """The validated recipe, refused before any import when it names untrusted code."""
    from prunekit.recipe_run import load_checked_recipe

    spec = load_checked_recipe(recipe, overrides)
    with trusting_code(trust_code):
        check_recipe_trust(spec, overrides, source=f"recipe {str(recipe)!r}")
    if trust_code:
        named = [v for v in (spec["data"], spec["model"]["arch"], spec["task"]["spec"]) if v]
        print_note(f"--trust-code: code named by {recipe} may be imported ({', '.join(named)})")
    return spec


def _resume_command(recipe: Path, overrides: list[str], out: Path) -> str:
    sets = " ".join(f"--set {shlex.quote(item)}" for item in overrides)
    parts = ["prunekit run", shlex.quote(str(recipe)), sets, "--out", shlex.quote(str(out))]
    return " ".join(p for p in parts if p) + " --resume"


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path = typer.Option(None, help="Run directory (default runs/<recipe name>)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last step."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    trust_code: bool = typer.Option(False, help=TRUST_CODE_HELP),
) -> None:
    """Run a compression recipe; exit 0 when every check passes, 1 when one fails."""
    from prunekit.recipe_run import run_recipe
    from prunekit.rundir import run_directory

    spec = _checked(recipe, set_, trust_code)
    out = out or Path("runs") / recipe.stem
    inputs = (recipe, *([Path(spec["model"]["checkpoint"])] if spec["model"]["checkpoint"] else []))
    sigterm_as_interrupt()
    bars = BarProgress(enabled=not quiet)
    owned = run_directory(
        out, overwrite=overwrite, resume=resume, inputs=inputs, extra_files=RECIPE_OUTPUTS
    )
    resume_line = _resume_command(recipe, set_, out)
    with trusting_code(trust_code), tracked_run(bars, resume_line), library_notes():
        with owned as work, bars:  # published as `out` only when the block completes
            report, checks = run_recipe(spec, work, resume=resume, progress=bars, final=out)
            plots(work)
    print_summary(report, out)
    if not print_checks(checks):
        raise typer.Exit(1)


@app.command()
def validate(
    recipes: list[Path] = typer.Argument(..., help="Recipe YAML files."),
    trust_code: bool = typer.Option(False, help=TRUST_CODE_HELP),
) -> None:
    """Check recipes against the schema and resolve their targets (no data, no compute)."""
    from prunekit.recipe_run import validate_recipe

    for path in recipes:
        spec = _checked(path, [], trust_code)
        with trusting_code(trust_code):
            checked = validate_recipe(spec)
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
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trust_code: bool = typer.Option(False, help=TRUST_CODE_HELP),
) -> None:
    """Print a recipe's step timeline and estimated passes, without training or scoring."""
    from prunekit.recipe_run import explain_recipe

    spec = _checked(recipe, set_, trust_code)
    with trusting_code(trust_code):
        plan = explain_recipe(spec)
    print_timeline(plan, f"timeline of {recipe}")
