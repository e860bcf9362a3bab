"""Shared helpers of the bench scripts: machine facts and BENCHMARKS.md sections."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import re
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_facts() -> str:
    """One line: date, CPU count, platform, python, torch and thread count."""
    cpu = platform.processor() or platform.machine()
    return (
        f"{dt.date.today().isoformat()}; {os.cpu_count()} CPU cores ({cpu}); "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def update_section(name: str, title: str, command: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with a fresh table."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = (
        f"{start}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine_facts()}\n\n"
        f"{body.strip()}\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# prunekit benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if start in text else text.rstrip() + "\n\n" + block
    BENCHMARKS.write_text(text.rstrip() + "\n")
    return BENCHMARKS


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats with 4 decimals."""

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def stdout_to_section(name: str, title: str):
    """Run a bench's main() and store everything it printed as the section ``name``.

    Worker/child invocations of a script (``--worker``/``--child`` in argv) write nothing.
    """
    if any(flag in sys.argv for flag in ("--worker", "--child")):
        yield
        return
    buffer = io.StringIO()
    real = sys.stdout
    sys.stdout = _Tee(real, buffer)
    try:
        yield
    finally:
        sys.stdout = real
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    update_section(name, title, command, buffer.getvalue())
