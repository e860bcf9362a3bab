"""Pruning schedules: exp (constant fraction of the remaining weights), linear, cubic."""

from __future__ import annotations

import math

import pytest

from prunekit.errors import SettingError
from prunekit.prune.schedules import SCHEDULES, schedule


@pytest.mark.parametrize(("final", "steps"), [(0.9, 10), (0.98847, 14), (0.956, 140), (0.5, 3)])
def test_exp_removes_the_same_fraction_of_the_remaining_weights(final, steps):
    values = schedule(final, steps, "exp")
    assert len(values) == steps
    assert values[-1] == final  # exactly, not just close
    remaining = [1.0] + [1.0 - v for v in values]
    ratios = [b / a for a, b in zip(remaining[:-1], remaining[1:], strict=True)]
    assert ratios == pytest.approx([(1.0 - final) ** (1.0 / steps)] * steps, rel=1e-12)
    assert all(a < b for a, b in zip(values[:-1], values[1:], strict=True))


def test_exp_matches_the_reference_per_step_rate():
    # methods.md 1.5: r = 1 - (1 - pr)^(1/pi); MLP pr = 0.98847, pi = 14 -> r = 0.273
    values = schedule(0.98847, 14)
    assert values[0] == pytest.approx(0.273, abs=5e-4)
    assert schedule(0.956, 140)[0] == pytest.approx(0.0221, abs=5e-5)


def test_exp_is_the_default():
    assert schedule(0.9, 5) == schedule(0.9, 5, "exp")


def test_linear_values():
    assert schedule(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-12)
    assert schedule(0.8, 4, "linear")[-1] == 0.8


def test_cubic_values():
    values = schedule(0.9, 3, "cubic")
    want = [0.9 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)]  # 0.6333.., 0.8666.., 0.9
    assert values == pytest.approx(want, rel=1e-12)
    assert values[0] == pytest.approx(0.9 * 19 / 27)
    assert values[-1] == 0.9
    # fast early, slow late: increments shrink
    steps = schedule(0.9, 10, "cubic")
    gaps = [b - a for a, b in zip([0.0, *steps[:-1]], steps, strict=True)]
    assert all(a > b for a, b in zip(gaps[:-1], gaps[1:], strict=True))


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_one_step_is_the_final_sparsity(kind):
    assert schedule(0.37, 1, kind) == [0.37]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_zero_final_gives_zeros(kind):
    assert schedule(0.0, 4, kind) == [0.0] * 4


@pytest.mark.parametrize(
    "steps",
    [
        0,
        -1,
        1.5,
        2.0001,
        True,
        "3",
        math.nan,
        math.inf,
        None,
    ],
)
def test_bad_steps_raise(steps):
    with pytest.raises(SettingError, match="steps"):
        schedule(0.9, steps)


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(SettingError) as info:
        schedule(0.9, 3, "cosine")
    assert "'cosine'" in str(info.value)
    assert all(kind in str(info.value) for kind in ("exp", "linear", "cubic"))


@pytest.mark.parametrize("final", [1.0, -0.1, math.nan])
def test_bad_final_sparsity_raises(final):
    with pytest.raises(SettingError):
        schedule(final, 3)
