"""next_masks (exact counts, monotone, deterministic ties), apply_masks, sparsity_of."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.errors import PrunekitError, SettingError
from prunekit.prune.masks import (
    apply_masks,
    check_sparsity,
    full_masks,
    masks_from_weights,
    next_masks,
    sparsity_of,
)
from prunekit.prune.schedules import schedule

SHAPES = {"a.weight": (7, 5), "b.weight": (3, 4, 3), "c.weight": (11,)}


def random_scores(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def fresh(shapes=SHAPES):
    return full_masks({n: torch.empty(s) for n, s in shapes.items()})


def pruned(masks) -> int:
    return sum(int((~m).sum()) for m in masks.values())


@settings(max_examples=60, deadline=None)
@given(
    sparsity=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_global_scope_prunes_exactly_round_s_n(sparsity, seed):
    masks = next_masks(random_scores(seed), fresh(), sparsity, "global")
    n = sum(math.prod(s) for s in SHAPES.values())
    assert pruned(masks) == round(sparsity * n)
    assert {k: m.shape for k, m in masks.items()} == {k: torch.Size(s) for k, s in SHAPES.items()}
    assert all(m.dtype == torch.bool for m in masks.values())


@settings(max_examples=60, deadline=None)
@given(
    sparsity=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_layer_scope_prunes_exactly_round_s_n_in_every_tensor(sparsity, seed):
    masks = next_masks(random_scores(seed), fresh(), sparsity, "layer")
    for name, shape in SHAPES.items():
        assert int((~masks[name]).sum()) == round(sparsity * math.prod(shape)), name


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_global_prunes_the_lowest_scores(scope):
    scores = random_scores(0)
    masks = next_masks(scores, fresh(), 0.4, scope)
    if scope == "global":
        flat_s = torch.cat([scores[n].flatten() for n in SHAPES])
        flat_m = torch.cat([masks[n].flatten() for n in SHAPES])
        assert flat_s[~flat_m].max() < flat_s[flat_m].min()
    else:
        for n in SHAPES:
            assert scores[n][~masks[n]].max() < scores[n][masks[n]].min()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_monotone_over_a_schedule_even_when_pruned_scores_become_huge(scope):
    masks = fresh()
    n = sum(math.prod(s) for s in SHAPES.values())
    for step, s in enumerate(schedule(0.9, 8, "exp")):
        scores = random_scores(100 + step)
        for name in scores:  # the pruned weights now look the most important of all
            scores[name][~masks[name]] = 1e30
        new = next_masks(scores, masks, s, scope)
        for name in SHAPES:
            assert not bool((new[name] & ~masks[name]).any()), "a pruned weight regrew"
        if scope == "global":
            assert pruned(new) == round(s * n)
        masks = new
    assert sparsity_of(masks)[0] == pytest.approx(round(0.9 * n) / n)


def test_lower_target_than_already_pruned_keeps_the_masks():
    masks = next_masks(random_scores(0), fresh(), 0.6)
    again = next_masks(random_scores(1), masks, 0.3)
    assert all(torch.equal(again[n], masks[n]) for n in SHAPES)


def test_inputs_are_not_modified():
    scores, masks = random_scores(0), next_masks(random_scores(1), fresh(), 0.2)
    s_copy = {n: v.clone() for n, v in scores.items()}
    m_copy = {n: v.clone() for n, v in masks.items()}
    next_masks(scores, masks, 0.7)
    assert all(
        torch.equal(scores[n], s_copy[n]) and torch.equal(masks[n], m_copy[n]) for n in SHAPES
    )


def test_all_equal_scores_prune_first_indices_in_order_global():
    shapes = {"x": (2, 3), "y": (4,)}
    scores = {n: torch.zeros(s) for n, s in shapes.items()}
    masks = next_masks(scores, fresh(shapes), 0.7)  # round(0.7 * 10) = 7
    assert masks["x"].flatten().tolist() == [False] * 6
    assert masks["y"].tolist() == [False, True, True, True]


def test_all_equal_scores_prune_first_indices_in_order_layer():
    shapes = {"x": (2, 3), "y": (4,)}
    scores = {n: torch.ones(s) for n, s in shapes.items()}
    masks = next_masks(scores, fresh(shapes), 0.5, "layer")  # 3 of 6, 2 of 4
    assert masks["x"].flatten().tolist() == [False, False, False, True, True, True]
    assert masks["y"].tolist() == [False, False, True, True]


def test_ties_among_survivors_are_broken_by_position_after_earlier_pruning():
    scores = {"x": torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0, 9.0])}
    masks = {"x": torch.tensor([True, True, False, True, True, True])}
    out = next_masks(scores, masks, 0.5)  # 3 pruned: index 2 already, then 1 and 3
    assert out["x"].tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_non_finite_scores_raise(bad, scope):
    scores = random_scores(0)
    scores["b.weight"][1, 2, 0] = bad
    with pytest.raises(PrunekitError, match="b.weight"):
        next_masks(scores, fresh(), 0.5, scope)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, -1e-9, math.nan, math.inf])
def test_sparsity_outside_unit_interval_or_nan_raises(bad):
    with pytest.raises(SettingError, match=r"\[0, 1\)"):
        next_masks(random_scores(0), fresh(), bad)
    with pytest.raises(SettingError):
        check_sparsity(bad)


def test_check_sparsity_accepts_the_valid_range():
    assert check_sparsity(0) == 0.0
    assert check_sparsity(0.999) == 0.999


def test_unknown_scope_names_valid_ones():
    with pytest.raises(SettingError, match="global, layer"):
        next_masks(random_scores(0), fresh(), 0.5, "row")


def test_scores_and_masks_must_name_the_same_tensors():
    scores = random_scores(0)
    del scores["c.weight"]
    with pytest.raises(SettingError, match="c.weight"):
        next_masks(scores, fresh(), 0.5)


def test_apply_masks_zeros_exactly_the_pruned_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    masks = next_masks(
        {n: torch.randn(p.shape) for n, p in targets.items()}, full_masks(targets), 0.5
    )
    apply_masks(model, masks)
    for n, p in model.named_parameters():
        if n in masks:
            assert bool((p[~masks[n]] == 0).all())
            assert torch.equal(p[masks[n]], before[n][masks[n]])
        else:  # biases untouched
            assert torch.equal(p, before[n])
    assert all(torch.equal(masks_from_weights(targets)[n], masks[n]) for n in masks)


def test_sparsity_of_values():
    masks = {
        "a": torch.tensor([True, False, False, True]),
        "b": torch.tensor([[False, False], [False, True]]),
        "c": torch.ones(2, dtype=torch.bool),
    }
    global_sparsity, per_layer = sparsity_of(masks)
    assert global_sparsity == pytest.approx(5 / 10)
    assert per_layer == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.0})
    assert sparsity_of({}) == (0.0, {})


def test_full_masks_are_all_true_bool_like_params():
    masks = full_masks({"w": torch.zeros(3, 2), "v": torch.zeros(4)})
    assert masks["w"].dtype == torch.bool and masks["w"].shape == (3, 2) and bool(masks["w"].all())
    assert sparsity_of(masks)[0] == 0.0
