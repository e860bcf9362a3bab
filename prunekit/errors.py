"""Errors that users can act on.

Every message names the bad value and what would be valid. The CLI prints the message as
one line and exits with status 2; library callers catch `PrunekitError`.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class: a user-facing problem (bad setting, file, data or model)."""

    exit_code = 2


class SettingError(PrunekitError, ValueError):
    """A setting has a value outside its valid set or range."""


class CheckpointError(PrunekitError):
    """A model file is missing, unreadable, untrusted or does not fit its architecture."""


class DataError(PrunekitError):
    """A data spec cannot be resolved, or the data does not fit the model or task."""


class ModelError(PrunekitError):
    """The model cannot be pruned as asked (no prunable weights, unsupported layer)."""


class RunDirError(PrunekitError):
    """The output directory is unusable (holds an earlier run, is the input, ...)."""


class VerificationError(PrunekitError):
    """A produced artefact failed its own verification (e.g. export parity); exit 1."""

    exit_code = 1


def choice_error(what: str, value: object, valid) -> SettingError:
    """Build the standard 'unknown X' error: names the value and lists the valid ones."""
    options = ", ".join(sorted(str(v) for v in valid))
    return SettingError(f"unknown {what} {value!r}; valid: {options}")


def int_setting(value: object, what: str, minimum: int, hint: str = "") -> int:
    """``value`` as an int if it is a whole number >= ``minimum``; SettingError otherwise.

    Rejects bools, None, NaN, infinities and fractions with a message naming the value.
    """
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or value < minimum:
        raise SettingError(f"{what} {value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message, at most ``limit`` characters.

    Third-party errors (torch.load, safetensors) carry multi-line essays; a user-facing
    PrunekitError message quotes only their first line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
