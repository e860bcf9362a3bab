"""The `prunekit` command line (typer). Commands live in cli_prune.py (prune), cli_tools.py
(example, plot, export) and cli_recipes.py (run, validate, explain); only the CLI prints.

User errors (PrunekitError, bad options) print one line `error: ...` on stderr and exit 2;
no traceback, nothing written. Ctrl-C / SIGTERM exit 130 with one line saying how far the
run got and how to resume it.
"""

from __future__ import annotations

import logging
import sys

import typer

from prunekit import cli_prune, cli_recipes, cli_tools  # noqa: F401 - register the commands
from prunekit.cli_common import ACTIVE, app, interrupted_line
from prunekit.console import print_error, usage_message
from prunekit.errors import PrunekitError

__all__ = ["app", "main"]


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
        print_error(usage_message(exc, sys.argv[1:] if argv is None else argv))
        code = 2
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except PrunekitError as exc:
        print_error(str(exc))
        code = exc.exit_code
    code = code if isinstance(code, int) else 0
    if code == 130:  # typer reports Ctrl-C / SIGTERM as exit code 130, silently
        print_error(ACTIVE.get("interrupted") or interrupted_line())
    ACTIVE.update(bars=None, resume=None, interrupted=None)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
