"""Upper bounds on sizes a user can ask for, checked before any work.

A typo such as ``--steps 1000000000000`` must end in one line, not in a MemoryError after a
minute. The bounds are far above any useful value (the paper used at most 140 steps).
"""

from __future__ import annotations

import math

from prunekit.errors import SettingError, int_setting

MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
MAX_STEPS = 10_000
MAX_EPOCHS = 10_000.0
MAX_EXAMPLES = 10_000_000
MAX_SAMPLES = 1_024
MAX_SHOTS = 64

#: setting -> (minimum, maximum, integer?)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "seed": (0, MAX_SEED, True),
    "steps": (1, MAX_STEPS, True),
    "samples": (1, MAX_SAMPLES, True),
    "shots": (0, MAX_SHOTS, True),  # 0 = auto (PruneSettings.shot_count)
    "score_examples": (1, MAX_EXAMPLES, True),
    "score_batch_size": (1, MAX_EXAMPLES, True),
    "batch_size": (1, MAX_EXAMPLES, True),
    "finetune_epochs": (0.0, MAX_EPOCHS, False),
    "final_epochs": (0.0, MAX_EPOCHS, False),
}


def check_bound(name: str, value: object, flag: str | None = None) -> None:
    """SettingError unless ``value`` lies within ``BOUNDS[name]`` (and is whole if integer).

    flag: how the user wrote the setting (``--seed``), for the message; NaN is refused.
    """
    low, high, integer = BOUNDS[name]
    what = flag or name
    if integer:
        int_setting(value, what, int(low), f" and <= {int(high):,}")
        value = int(value)
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not value == value:
        raise SettingError(f"{what} {value!r} must be a number in [{low:g}, {high:g}]")
    shown = f"{int(high):,}" if integer else f"{high:,g}"
    if value < low:
        raise SettingError(f"{what} {value!r} must be >= {low:g} (and <= {shown})")
    if value > high:
        raise SettingError(f"{what} {value!r} must be <= {shown}")


#: settings that must be finite numbers (their ranges are checked where they are used)
FINITE = ("lr", "lam", "temperature", "momentum", "weight_decay", "distill_weight")


def check_bounds(values: dict, flags: dict[str, str] | None = None) -> None:
    """``check_bound`` for every key of ``values`` that has a bound, and NaN/Inf refused for
    the ``FINITE`` ones (others are ignored). flags: key -> how the user wrote it."""
    flags = flags or {}
    for name, value in values.items():
        if name in BOUNDS:
            check_bound(name, value, flags.get(name))
        elif name in FINITE and isinstance(value, float) and not math.isfinite(value):
            raise SettingError(f"{flags.get(name, name)} {value!r} must be a finite number")
