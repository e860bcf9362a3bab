"""What the CLI shows a person: progress bars, summary tables, one-line errors.

Only the CLI (prunekit/cli*.py) uses this module; library code logs through `logging`.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

out_console = Console()
err_console = Console(stderr=True)


class BarProgress:
    """progress(label, done, total) callback drawing one rich bar per label on stderr.

    Remembers the last (done, total) of the 'steps' bar even when drawing is disabled, so an
    interrupt can say how far the run got.
    """

    def __init__(self, enabled: bool = True):
        self.started = False
        self.steps_done: tuple[int, int] | None = None
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
        if label == "steps":
            self.steps_done = (done, total)
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


def fmt(value, digits: int = 4) -> str:
    """A table cell: '-' for None, fixed digits for floats."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_summary(report: dict, out) -> None:
    """The end-of-run table: dense / pruned / fine-tuned metrics and the sparsity line (the
    last row is 'after update' or 'final' in a run that fine-tunes nowhere; 'pruned' is
    right after the last removal, before its update)."""
    mode = report.get("update", {}).get("mode", "none")
    update = f" + {mode} update" if mode != "none" else ""
    table = Table(title=f"prunekit {report['criterion']}{update} -> {out}")
    extra = [k for k in ("cosine", "agreement") if k in report["metrics"]["dense"]]
    for col in ("model", "loss", "accuracy", *extra):
        table.add_column(col, justify="right" if col != "model" else "left")
    run = report.get("settings", {})
    tuned = run.get("finetune_epochs", 1) or run.get("final_epochs", 1)
    last = "fine-tuned" if tuned else ("after update" if update else "final")
    rows = (("dense", "dense"), ("pruned", "pruned"), ("finetuned", last))
    for key, label in rows:
        m = report["metrics"][key]
        table.add_row(label, fmt(m["loss"]), fmt(m["accuracy"]), *(fmt(m[k]) for k in extra))
    out_console.print(table)
    sp = report["sparsity"]
    out_console.print(
        f"sparsity {sp['global']:.4f} of {report['params']['prunable']:,} target weights "
        f"({sp['all_parameters']:.4f} of all {report['params']['total']:,}); "
        f"{len(report['steps'])} steps in {report['seconds']:.1f} s"
    )


def print_receipt(receipt: dict, rows: list[tuple[str, str]]) -> None:
    """The export receipt as a two-column table (``rows`` from export.receipt_table)."""
    table = Table(title=f"ONNX export -> {receipt['path']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(escape(key), escape(value))  # "[batch, sequence]" is not markup
    out_console.print(table)


def print_checks(checks: list[dict]) -> bool:
    """The recipe's gates as a table; True when every check passed."""
    table = Table(title="checks")
    for col in ("check", "limit", "value", "result"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for row in checks:
        table.add_row(
            row["check"], fmt(row["limit"]), fmt(row["value"]), "pass" if row["passed"] else "FAIL"
        )
    if checks:
        out_console.print(table)
    return all(row["passed"] for row in checks)


_TIMELINE = (
    "step",
    "sparsity",
    "kept",
    "per layer",
    "FT epochs",
    "score fwd",
    "score bwd",
    "FT fwd+bwd",
)


def print_timeline(plan: dict, title: str) -> None:
    """`prunekit explain`: one row per step, the totals, then the plan's notes."""
    table = Table(title=escape(title))
    for col in _TIMELINE:
        table.add_column(col, justify="right")
    for r in plan["rows"]:
        table.add_row(
            str(r["step"]),
            f"{r['sparsity']:.4f}",
            fmt(r["kept"]),
            fmt(r["per_layer"]),
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
        out_console.print(f"note: {note}", markup=False)


def print_note(message: str) -> None:
    """One 'note: ...' line on stderr (a warning a person should read, not an error)."""
    err_console.print(f"note: {message}", highlight=False, soft_wrap=True, markup=False)


def print_error(message: str) -> None:
    """The one line a user error prints: 'error: ...' on stderr, whitespace collapsed."""
    one_line = " ".join(message.split())
    err_console.print(f"error: {one_line}", highlight=False, soft_wrap=True, markup=False)


def usage_message(exc, argv: list[str]) -> str:
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
