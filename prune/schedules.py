"""Pruning schedules: pure functions giving the cumulative target sparsity after each step."""

from __future__ import annotations

from collections.abc import Callable

from prunekit.errors import choice_error, int_setting
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
    steps = int_setting(steps, "steps", 1)
    values = SCHEDULES[kind](final, steps)
    values[-1] = final  # exact end point despite rounding
    return values
