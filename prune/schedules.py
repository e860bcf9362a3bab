"""Pruning schedules: pure functions giving the cumulative target sparsity after each step."""

from __future__ import annotations

from collections.abc import Callable

from prunekit.errors import SettingError, choice_error
from prunekit.prune.masks import check_sparsity


def _exponential(final: float, steps: int) -> list[float]:
    # Every step removes the same fraction of the remaining weights (methods.md 1.5).
    return [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]


def _linear(final: float, steps: int) -> list[float]:
    return [final * k / steps for k in range(1, steps + 1)]


def _cubic(final: float, steps: int) -> list[float]:
    # Zhu & Gupta (2017): fast early, slow near the end.
    return [final * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]


SCHEDULES: dict[str, Callable[[float, int], list[float]]] = {
    "exp": _exponential,
    "linear": _linear,
    "cubic": _cubic,
}


def schedule(final: float, steps: int, kind: str = "exp") -> list[float]:
    """Cumulative sparsities s_1 < ... < s_steps = final (fractions of target weights).

    kind: 'exp' (each step removes the same fraction of the remaining weights; default),
    'linear' or 'cubic'. steps >= 1.
    """
    final = check_sparsity(final)
    if kind not in SCHEDULES:
        raise choice_error("schedule", kind, SCHEDULES)
    try:
        whole = not isinstance(steps, bool) and int(steps) == steps
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or steps < 1:
        raise SettingError(f"steps {steps!r} must be an integer >= 1")
    values = SCHEDULES[kind](final, int(steps))
    values[-1] = final  # exact end point despite rounding
    return values
