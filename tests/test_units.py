"""The units run (prunekit/units.py) through a minimal stand-in for loop.py's ``_Run``:
exact unit counts, monotone steps, both scopes, every group criterion (BatchNorm members on
the diagonal Fisher), OBS compensation, masks <-> kept units, refusals, shrink and report."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from prunekit.criteria.scores import make_criterion
from prunekit.data import bundle_from_batches
from prunekit.errors import SettingError
from prunekit.prune.groups import Member, UnitGroup
from prunekit.prune.targets import find_targets
from prunekit.ranks import label_key
from prunekit.types import ClassificationTask
from prunekit.units import (
    check_unit_sparsity,
    plan_units,
    select_units,
    shrink_result,
    unit_step,
    units_report,
)

TASK = ClassificationTask()


@dataclass(frozen=True)
class Settings:
    """The PruneSettings fields the units functions read."""

    criterion: str = "obd"
    sparsity: float = 0.5
    scope: str = "global"
    masked_scaling: bool = False

    @property
    def criterion_name(self) -> str:
        return self.criterion


@dataclass
class Run:
    """Stand-in for loop.py's ``_Run`` (the fields ``unit_step`` reads and writes)."""

    model: nn.Module
    task: object
    settings: Settings
    units: object
    masks: dict
    cache: dict = field(default_factory=dict)
    estimators: dict = field(default_factory=dict)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def mlp_groups() -> list[UnitGroup]:
    return [
        UnitGroup("0", "neuron", 8, (Member("0.weight", 0), Member("0.bias", 0),
                                     Member("2.weight", 1, "in"))),
        UnitGroup("2", "neuron", 5, (Member("2.weight", 0), Member("2.bias", 0),
                                     Member("4.weight", 1, "in"))),
    ]  # fmt: skip


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 6), nn.ReLU(), nn.Linear(6, 3),
    )  # fmt: skip


def bn_groups() -> list[UnitGroup]:
    return [
        UnitGroup("0", "channel", 4, (Member("0.weight", 0), Member("1.weight", 0),
                                      Member("1.bias", 0), Member("5.weight", 1, "in", width=9))),
        UnitGroup("5", "neuron", 6, (Member("5.weight", 0), Member("5.bias", 0),
                                     Member("7.weight", 1, "in"))),
    ]  # fmt: skip


def data(model: nn.Module, n: int = 40):
    g = torch.Generator().manual_seed(1)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 1, 6, 6)
    x = torch.randn(shape, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def make_run(model, groups, settings=Settings()):
    x, y = data(model)
    bundle = bundle_from_batches([(x, y)], seed=0)
    plan = plan_units(model, TASK, bundle, find_targets(model), settings, groups=groups)
    return Run(model, TASK, settings, plan, plan.full_masks()), [(x, y)]


def crit_of(name: str, **kw):
    return make_criterion(name, **kw)


def test_global_steps_remove_exact_counts_monotone_and_zero_every_member():
    run, batches = make_run(mlp(), mlp_groups())
    plan = run.units
    assert plan.total == 13 and set(run.masks) == {"0.weight", "0.bias", "2.weight", "2.bias",
                                                   "4.weight"}  # fmt: skip
    crit = crit_of("obd", fisher="kfac", labels="exact")
    first = unit_step(run, crit, batches, label_key(0, 1), 0.3)
    keep1 = plan.keep_of(run.masks)
    assert sum(int((~k).sum()) for k in keep1.values()) == round(0.3 * 13)
    assert first["sparsity"] == pytest.approx(round(0.3 * 13) / 13)
    assert first["units_kept"] == {n: int(k.sum()) for n, k in keep1.items()}
    second = unit_step(run, crit, batches, label_key(0, 2), 0.7)
    keep2 = plan.keep_of(run.masks)
    assert sum(int((~k).sum()) for k in keep2.values()) == round(0.7 * 13)
    for n in keep1:  # monotone: removed units stay removed
        assert not bool((keep2[n] & ~keep1[n]).any())
        assert int(keep2[n].sum()) >= 1
    params = dict(run.model.named_parameters())
    gone0 = torch.nonzero(~keep2["0"]).flatten()
    assert bool((params["0.weight"][gone0] == 0).all())
    assert bool((params["0.bias"][gone0] == 0).all())
    assert bool((params["2.weight"][:, gone0] == 0).all())
    assert second["weight_sparsity"] > 0 and run.estimators


def test_layer_scope_removes_round_s_size_per_group():
    run, batches = make_run(mlp(), mlp_groups(), Settings(scope="layer"))
    run.masks["4.bias"] = torch.ones(3, dtype=torch.bool)  # in no group: kept as it is
    unit_step(run, crit_of("magnitude"), batches, label_key(0, 1), 0.5)
    assert bool(run.masks["4.bias"].all())
    keep = run.units.keep_of(run.masks)
    assert int((~keep["0"]).sum()) == 4 and int((~keep["2"]).sum()) == round(0.5 * 5)


def test_global_selection_takes_the_lowest_scores_and_keeps_one_per_group():
    run, _ = make_run(mlp(), mlp_groups())
    plan = run.units
    scores = {"0": torch.arange(8.0) + 100, "2": torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0])}
    keep = {n: torch.ones(g.size, dtype=torch.bool) for n, g in ((g.name, g) for g in plan.groups)}
    out = select_units(plan, scores, keep, 5 / 13, "global")
    # group '2' has the 5 lowest scores, but its best unit (score 5) must stay
    assert out["2"].tolist() == [True, False, False, False, False]
    assert out["0"].tolist() == [False] + [True] * 7
    with pytest.raises(Exception, match="not finite"):
        select_units(plan, {"0": torch.full((8,), float("nan")), "2": scores["2"]}, keep, 0.5,
                     "global")  # fmt: skip


@pytest.mark.parametrize(
    "name,kw",
    [("magnitude", {}), ("lm", {}), ("qm", {"fisher": "kfac"}), ("obd", {"fisher": "ekfac"}),
     ("obd", {"fisher": "diag"}), ("obs", {"fisher": "kfac"})],
)  # fmt: skip
def test_every_group_criterion_runs_on_a_batchnorm_cnn(name, kw):
    run, batches = make_run(bn_cnn(), bn_groups(), Settings(criterion=name))
    assert "1.weight" in run.units.targets  # BatchNorm: a diagonal-Fisher member
    assert "5.bias" not in run.units.targets or kw.get("fisher") == "diag"
    entries = unit_step(run, crit_of(name, **kw), batches, label_key(0, 1), 0.4)
    keep = run.units.keep_of(run.masks)
    assert sum(int((~k).sum()) for k in keep.values()) == 4
    bn = dict(run.model.named_parameters())["1.weight"]
    assert bool((bn[~keep["0"]] == 0).all())
    assert entries["units_kept"] == {"0": int(keep["0"].sum()), "5": int(keep["5"].sum())}


def test_obs_compensates_the_consumers_remaining_columns():
    model = mlp()
    run, batches = make_run(model, mlp_groups(), Settings(criterion="obs"))
    before = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    entries = unit_step(run, crit_of("obs", fisher="kfac", labels="exact"), batches,
                        label_key(0, 1), 0.3)  # fmt: skip
    keep = run.units.keep_of(run.masks)
    after = dict(model.named_parameters())
    assert set(entries["obs_compensated"]) >= {"2.weight"} or not (~keep["0"]).any()
    if (~keep["0"]).any():  # the kept columns of the consumer moved, its bias too
        kept = torch.nonzero(keep["0"]).flatten()
        assert not torch.equal(after["2.weight"][:, kept], before["2.weight"][:, kept])
        assert not torch.equal(after["2.bias"], before["2.bias"])


def test_masks_and_kept_units_round_trip_for_resume():
    run, _ = make_run(mlp(), mlp_groups())
    plan = run.units
    keep = {"0": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
            "2": torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool)}  # fmt: skip
    back = plan.keep_of(plan.masks_for(keep))
    assert all(torch.equal(back[n], keep[n]) for n in keep)


def test_refusals_are_one_line_setting_errors():
    groups = mlp_groups()
    with pytest.raises(SettingError, match="removes all 5 units of layer '2'") as err:
        check_unit_sparsity(groups, 0.92, "layer")
    assert "\n" not in str(err.value) and "below 0.9000" in str(err.value)
    with pytest.raises(SettingError, match="keeps one"):
        check_unit_sparsity(groups, 0.9, "global")
    check_unit_sparsity(groups, 0.8, "global")  # 10 of 13 removed, 2 groups keep one each
    with pytest.raises(SettingError, match="criterion for --structure units"):
        make_run(mlp(), groups, Settings(criterion="wanda"))


def test_report_counts_and_the_shrunk_model_equal_the_masked_one():
    pytest.importorskip("prunekit.prune.shrink")
    model = bn_cnn().eval()
    run, batches = make_run(model, bn_groups())
    unit_step(run, crit_of("magnitude"), batches, label_key(0, 1), 0.5)
    small = shrink_result(model, run.units, run.masks)
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-5, atol=1e-6)
    report = units_report(run.units, run.masks)
    assert report["units_before"] == 10 and report["units_after"] == 5
    assert report["params_before"] == sum(p.numel() for p in model.parameters())
    assert report["params_after"] == sum(p.numel() for p in small.parameters())
    assert sum(v["after"] for v in report["groups"].values()) == 5


def test_plan_traces_the_groups_of_a_plain_mlp():
    pytest.importorskip("prunekit.prune.trace")
    model = mlp()
    x, y = data(model)
    bundle = bundle_from_batches([(x, y)], seed=0)
    plan = plan_units(model, TASK, bundle, find_targets(model), Settings())
    assert sorted(g.size for g in plan.groups) == [5, 8]  # the logits are never units
    assert {m.param for g in plan.groups for m in g.members} == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
    }


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_hidden_units_score_on_the_diagonal_fisher_and_step(cell):
    # nn.LSTM/GRU members are not Kronecker-factored: their group quadratic comes from the
    # diagonal Fisher (the estimator's fallback), the head's columns from KFAC.
    pytest.importorskip("prunekit.prune.trace")
    from prunekit.models import lstm

    torch.manual_seed(0)
    model = lstm(input_size=4, hidden=6, classes=3, cell=cell, rows=5)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 5, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    bundle = bundle_from_batches([(x, y)], seed=0)
    settings = Settings(criterion="obd")
    plan = plan_units(model, TASK, bundle, find_targets(model), settings)
    assert [gr.kind for gr in plan.groups] == ["hidden"] and plan.total == 6
    run = Run(model, TASK, settings, plan, plan.full_masks())
    unit_step(run, crit_of("obd", fisher="kfac"), [(x, y)], label_key(0, 1), 0.5)
    assert set(run.estimators.values()) == {"kfac", "diag"}
    keep = plan.keep_of(run.masks)[plan.groups[0].name]
    assert int(keep.sum()) == 3
    small = shrink_result(model, plan, run.masks)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_resumed_units_run_restores_every_member_mask(tmp_path):
    import copy

    from prunekit.data import load_data
    from prunekit.loop import run_pruning
    from prunekit.models import mlp as zoo_mlp
    from prunekit.settings import PruneSettings

    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = zoo_mlp("64,32,16,10")
    settings = PruneSettings(
        criterion="obd", fisher="ekfac", sparsity=0.5, steps=2, structure="units",
        finetune_epochs=0.2, final_epochs=0.2, lr=0.01, score_examples=100,
    )  # fmt: skip
    straight = run_pruning(copy.deepcopy(model), data, settings, state_dir=tmp_path)
    resumed = run_pruning(copy.deepcopy(model), data, settings, state_dir=tmp_path, resume=True)
    assert torch.equal(resumed.masks["1.bias"], straight.masks["1.bias"])
    after = resumed.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in straight.model.state_dict().items())
