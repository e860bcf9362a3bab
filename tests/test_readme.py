"""The README runs as printed: every shell block, in order, in a fresh folder.

A new user runs `make demo`, `source .venv/bin/activate`, then copies commands from the
README top to bottom. This test does the same with the installed `prunekit` on PATH, in a
temporary folder holding only what a checkout has (recipes/). `make demo` itself is
replaced by the commands of the Makefile's demo target (the venv already exists here).
A block preceded by `<!-- readme-test: skip (reason) -->` is not run; the reason is kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(
    r"(<!-- readme-test: skip \((?P<why>[^)]*)\) -->\n)?```bash\n(?P<body>.*?)```", re.S
)
SETUP = ("make demo", "make test", "source .venv/bin/activate")


def readme_commands(text: str) -> tuple[list[str], list[str]]:
    """(commands to run, in order; reasons of the skipped blocks). Continuation lines are
    joined and comments dropped; the set-up commands are left to the caller."""
    commands, skipped = [], []
    for match in BLOCK.finditer(text):
        if match["why"]:
            skipped.append(match["why"])
            continue
        body = match["body"].replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line and not line.startswith(SETUP):
                commands.append(line)
    return commands, skipped


def demo_commands() -> list[str]:
    """The Makefile's demo target, as a user's shell would run it after activating .venv."""
    make = (ROOT / "Makefile").read_text()
    body = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    lines = [line.strip() for line in body.splitlines()[1:] if line.strip()]
    return [line.replace("$(BIN)/", "").replace("$(DEMO_DIR)", "runs/demo") for line in lines]


def test_readme_parser_finds_the_commands():
    commands, skipped = readme_commands(README.read_text())
    assert any(c.startswith("prunekit example") for c in commands)
    assert any(c.startswith("prunekit run") for c in commands)
    assert all(not c.startswith("#") and "\\" not in c for c in commands)
    assert skipped and all(reason.strip() for reason in skipped)
    assert "source .venv/bin/activate" in README.read_text()
    assert demo_commands()[0].startswith("prunekit example mlp-mnist")


def test_every_readme_command_runs_as_printed(tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "prunekit").is_file():
        pytest.skip("needs the prunekit console script (make install)")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["COLUMNS"] = "120"
    commands, _ = readme_commands(README.read_text())
    for command in [*demo_commands(), *commands]:
        done = subprocess.run(  # through bash: globs like recipes/*.yaml expand as printed
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, command

