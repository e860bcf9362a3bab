"""Shots, OBS update modes, mixed distillation and the per-phase rate schedule (issue 16)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import prunekit.loop as loop_module
from prunekit.data import load_data
from prunekit.errors import SettingError
from prunekit.loop import run_pruning
from prunekit.models import mlp
from prunekit.preflight import validate
from prunekit.settings import PruneSettings
from prunekit.tasks import DistillationTask
from prunekit.types import ClassificationTask, Task

BASE = dict(sparsity=0.6, steps=2, lr=0.05, finetune_epochs=0.5, final_epochs=0.5)


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic?n=120&dim=8&classes=3")


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return mlp("8,12,3")


def _run(model, data, **kw):
    return run_pruning(copy.deepcopy(model), data, PruneSettings(**(BASE | kw)))


def test_shots_score_once_per_shot_and_reach_each_slice(data, dense, monkeypatch):
    seen = []
    real = loop_module.next_masks

    def spy(scores, masks, sparsity, scope="global"):
        seen.append(sparsity)
        return real(scores, masks, sparsity, scope)

    monkeypatch.setattr(loop_module, "next_masks", spy)
    result = _run(dense, data, shots=3)
    assert len(seen) == 6  # 2 steps x 3 shots, each after a fresh score
    # each shot's target is an equal slice between the step's start and its target
    assert seen[2] == pytest.approx(seen[0] * 3, rel=1e-9)
    assert seen[1] == pytest.approx(seen[0] * 2, rel=1e-9)
    assert result.report["sparsity"]["global"] == pytest.approx(0.6, abs=0.01)


def test_shots_change_the_masks_and_are_deterministic(data):
    torch.manual_seed(2)
    wide = mlp("8,32,3")
    kw = dict(criterion="obd", finetune_epochs=0.0, final_epochs=0.0, steps=1, sparsity=0.9)
    one = _run(wide, data, **kw)
    three = _run(wide, data, shots=3, **kw)
    again = _run(wide, data, shots=3, **kw)
    assert all(torch.equal(three.masks[n], again.masks[n]) for n in three.masks)
    assert any(not torch.equal(one.masks[n], three.masks[n]) for n in one.masks)


def test_update_summed_is_the_old_compensate(data, dense):
    old = _run(dense, data, compensate=True)
    new = _run(dense, data, update="summed")
    for name, p in old.model.state_dict().items():
        assert torch.equal(p, new.model.state_dict()[name])
    assert old.metrics[1]["loss_after_compensation"] == new.metrics[1]["loss_after_compensation"]


def test_update_with_shots_records_the_last_shot(data, dense):
    result = _run(dense, data, update="summed", shots=2)
    row = result.metrics[1]
    assert row["loss_before_compensation"] == row["loss_after_prune"]
    assert row["loss_after_compensation"] != row["loss_before_compensation"]


def test_mixed_distillation_loss_is_the_weighted_sum():
    torch.manual_seed(1)
    logits, teacher = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    task = DistillationTask(Task(), "kl", 2.0, ClassificationTask(), task_weight=0.3)
    batch = (torch.zeros(5, 1), {"teacher": teacher, "labels": labels})
    p_t = torch.softmax(teacher.double() / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits.double() / 2, 1))).sum(1).mean() * 4
    ce = F.cross_entropy(logits.double(), labels)
    assert float(task.loss(logits, batch)) == pytest.approx(float(0.7 * kl + 0.3 * ce), rel=1e-5)


def test_distill_weight_trains_on_both_and_is_reported(data, dense):
    result = _run(dense, data, distill_weight=0.5, lr_schedule="cosine")
    assert result.report["task"]["distill_weight"] == 0.5
    assert result.report["task"]["kind"] == "distill"
    assert result.report["metrics"]["finetuned"]["accuracy"] is not None


def test_lr_schedule_reaches_every_phase():
    settings = PruneSettings(lr_schedule="cosine", lr=0.1)
    assert settings.finetune_settings(1.0).lr_schedule == "cosine"
    assert settings.finetune_settings(1.0, 0.02).lr_schedule == "cosine"


BAD = [
    ({"update": "both"}, "update 'both'"),
    ({"update": "joint", "criterion": "magnitude"}, "--update joint needs a curvature"),
    ({"update": "summed", "fisher": "diag"}, "--update summed needs a curvature"),
    ({"update": "rows", "criterion": "wanda"}, "--update rows needs a curvature"),
    ({"update": "rows", "criterion": "sparsegpt"}, "--update rows does nothing"),
    ({"compensate": True, "update": "joint"}, "contradicts --update joint"),
    ({"shots": -1}, "--shots -1"),
    ({"shots": 3, "criterion": "magnitude"}, "--shots 3 does nothing"),
    ({"structure": "rows"}, "structure 'rows'"),
    ({"distill_weight": 1.5}, "--distill-weight 1.5"),
    ({"distill_weight": float("nan")}, "--distill-weight nan"),
    ({"distill_weight": 0.5, "loss": "distill"}, "--distill-weight 0.5 mixes"),
    ({"lr_schedule": "step"}, "lr schedule 'step'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_step_modes_are_refused(data, dense, settings, message):
    from prunekit.distill import prepare_task

    with pytest.raises(SettingError, match=message.replace("(", r"\(")):
        s = PruneSettings(**settings)
        prepare_task(dense, data, s)
        validate(s, copy.deepcopy(dense), data, ClassificationTask())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--update", "joint", "--criterion", "magnitude"], "--update joint needs a curvature"),
        (["--shots", "-1"], "--shots -1"),
        (["--distill-weight", "2"], "--distill-weight 2"),
        (["--lr-schedule", "step"], "lr schedule 'step'"),
        (["--structure", "rows"], "structure 'rows'"),
    ],
)
def test_cli_refuses_bad_step_modes_in_one_line(tmp_path, digits_model_file, cli, args, message):
    out = tmp_path / "run"
    code, stdout, stderr = cli("prune", str(digits_model_file), "--out", str(out), *args)
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr + stdout and not out.exists()


@pytest.mark.parametrize("mode", ["joint", "rows"])
def test_update_chooses_damping_per_layer_on_held_out_examples(data, dense, mode):
    result = _run(dense, data, update=mode, score_examples=60)
    assert result.report["update"]["mode"] == mode
    assert result.report["update"]["damping_chosen_on"] == "validation[0:24]"  # 24 val examples
    row = result.metrics[1]
    assert set(row["update_damping"]) == {"1.weight", "3.weight"}
    assert all(v == "none" or v in (1e-2, 1e-1, 1.0) for v in row["update_damping"].values())
    params = dict(result.model.named_parameters())
    assert all(not params[n][~m].any() for n, m in result.masks.items())


def test_damping_groups_are_consecutive_near_equal_and_cover_every_layer():
    from prunekit.obsupdate import MAX_GROUPS, damping_groups

    names = [f"l{i}" for i in range(36)]
    groups = damping_groups(names)
    assert len(groups) == MAX_GROUPS == 8 and [n for g in groups for n in g] == names
    assert {len(g) for g in groups} == {4, 5}
    assert damping_groups(names[:3]) == [["l0"], ["l1"], ["l2"]]  # shallow: one per layer
    assert damping_groups(names[:8]) == [[n] for n in names[:8]]
    assert damping_groups([]) == []


def _counted_damping_setup(data, dense, monkeypatch):
    """(model, task, scored, masks, held-out batches, list that grows by one per held-out
    evaluation) for a 70% step of ``dense`` scored by obd on 60 examples."""
    import prunekit.obsupdate as ou
    from prunekit.prune.masks import next_masks
    from prunekit.prune.targets import find_targets
    from prunekit.settings import make_run_criterion

    model = copy.deepcopy(dense)
    task, targets = ClassificationTask(), find_targets(model)
    scored = make_run_criterion(PruneSettings(criterion="obd")).evaluate(
        model, task, targets, data.first_train(60)
    )
    full = {n: torch.ones(t.shape, dtype=bool) for n, t in targets.items()}
    masks = next_masks(scored.scores, full, 0.7)
    held, _ = ou.held_out_batches(data, 60, "cpu")
    calls = []
    real = ou._loss
    monkeypatch.setattr(ou, "_loss", lambda *a: calls.append(1) or real(*a))
    return model, task, scored, masks, held, calls


def test_grouped_search_gives_a_group_one_damping_in_1_plus_3_evaluations(data, dense,
                                                                          monkeypatch):
    import prunekit.obsupdate as ou

    model, task, scored, masks, held, calls = _counted_damping_setup(data, dense, monkeypatch)
    monkeypatch.setattr(ou, "MAX_GROUPS", 1)
    deltas, choice = ou.choose_damping(model, task, scored.curvature, masks, held, "rows")
    assert len(calls) == 4 and len(choice) == 2 and len(set(choice.values())) == 1
    best = next(iter(choice.values()))
    if best != "none":  # the group's layers carry that damping's update, bias included
        params = dict(model.named_parameters())
        want = ou.rows_update(scored.curvature, params, masks, damping=best)
        assert all(torch.equal(deltas[n], want[n]) for n in want)


def test_damping_is_chosen_on_validation_else_on_unscored_training_examples(data):
    import dataclasses

    from prunekit.obsupdate import HELD_OUT, held_out_batches

    batches, source = held_out_batches(data, 60, "cpu", batch=10)
    assert source == "validation[0:24]" and [len(b[1]) for b in batches] == [10, 10, 4]
    assert torch.equal(torch.cat([b[0] for b in batches]), data.x_val[:24])
    none = dataclasses.replace(data, x_val=data.x_val[:0], y_val=data.y_val[:0])
    batches, source = held_out_batches(none, 60, "cpu")
    assert source == "train[60:96]"  # never the 60 scoring examples
    assert torch.equal(batches[0][0], data.x_train[60:96])
    big = dataclasses.replace(data, x_val=data.x_train.repeat(8, 1), y_val=data.y_train.repeat(8))
    assert held_out_batches(big, 60, "cpu")[1] == f"validation[0:{HELD_OUT}]"


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({}, "obs"),
        ({"sparsity": 0.95}, "obs"),
        ({"sparsity": 1 - 0.8**20}, "obd"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0}, "obd"),  # one shot: obd + rows
        ({"structure": "units"}, "obd"),
        ({"criterion": "obd"}, "obd"),
        ({"criterion": "magnitude", "sparsity": 0.5}, "magnitude"),
    ],
)
def test_auto_criterion_resolves_by_target_fine_tuning_and_structure(kw, name):
    settings = PruneSettings(**kw)
    assert settings.criterion_name == name
    from prunekit.criteria import CRITERIA
    from prunekit.settings import make_run_criterion

    assert type(make_run_criterion(settings)) is CRITERIA[name]


def test_auto_criterion_run_reports_what_ran_and_what_was_asked(data, dense):
    auto = _run(dense, data, score_examples=60)
    assert (auto.report["criterion"], auto.report["criterion_requested"]) == ("obs", "auto")
    assert auto.report["update"]["mode"] == "rows"
    explicit = _run(dense, data, score_examples=60, criterion="obs", update="rows")
    params = dict(auto.model.named_parameters())
    other = dict(explicit.model.named_parameters())
    assert all(torch.equal(params[n], other[n]) for n in params)  # auto IS obs + rows
    assert auto.report["criterion_requested"] != explicit.report["criterion_requested"]
    high = _run(dense, data, score_examples=60, sparsity=0.97)
    assert (high.report["criterion"], high.report["update"]["mode"]) == ("obd", "none")


@pytest.mark.parametrize("mode", ["joint", "rows"])
def test_update_never_loses_to_no_update_on_held_out(data, dense, mode):
    from prunekit.finetune import evaluate
    from prunekit.obsupdate import choose_damping, held_out_batches
    from prunekit.prune.masks import apply_masks, next_masks
    from prunekit.prune.targets import find_targets

    model = copy.deepcopy(dense)
    task, targets = ClassificationTask(), find_targets(model)
    crit = PruneSettings(criterion="obd")
    from prunekit.settings import make_run_criterion

    batches = data.first_train(60)
    scored = make_run_criterion(crit).evaluate(model, task, targets, batches)
    masks = next_masks(scored.scores, {n: torch.ones(t.shape, dtype=bool) for n, t in
                                       targets.items()}, 0.7)  # fmt: skip
    held, _ = held_out_batches(data, 60, "cpu")
    deltas, choice = choose_damping(model, task, scored.curvature, masks, held, mode)
    assert set(choice) == {"1.weight", "3.weight"}
    plain = copy.deepcopy(model)
    apply_masks(plain, masks)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d)
    assert evaluate(model, task, held)["loss"] <= evaluate(plain, task, held)["loss"] + 1e-6


def test_sparsegpt_criterion_reconstructs_layer_by_layer(data, dense):
    result = _run(dense, data, criterion="sparsegpt", finetune_epochs=0.0, final_epochs=0.0)
    row = result.metrics[1]
    assert set(row["reconstruction_error"]) == {"1.weight", "3.weight"}
    assert result.report["sparsity"]["global"] == pytest.approx(0.6, abs=0.01)
    magnitude = _run(dense, data, criterion="magnitude", finetune_epochs=0.0, final_epochs=0.0)
    assert result.metrics[-1]["loss_after_prune"] < magnitude.metrics[-1]["loss_after_prune"]


def test_explain_counts_every_shot():
    from pathlib import Path

    from prunekit.recipe_run import explain_recipe, load_checked_recipe

    path = Path(__file__).resolve().parent.parent / "recipes" / "ci-digits-obd.yaml"
    one = explain_recipe(load_checked_recipe(path))
    two = explain_recipe(load_checked_recipe(path, ["criterion.shots=2"]))
    assert two["totals"]["score_forward"] == 2 * one["totals"]["score_forward"]
    assert two["totals"]["score_backward"] == 2 * one["totals"]["score_backward"]
    assert any("shots 2" in n for n in two["notes"])


def test_explain_names_what_the_auto_criterion_resolves_to():
    from pathlib import Path

    from prunekit.recipe_run import explain_recipe, load_checked_recipe

    path = Path(__file__).resolve().parent.parent / "recipes" / "ci-digits-obd.yaml"
    auto = explain_recipe(load_checked_recipe(path, ["criterion.name=auto"]))
    assert "criterion auto: obs, update rows" in auto["notes"]
    assert any("validation examples choose the damping" in n for n in auto["notes"])
    high = ["criterion.name=auto", "schedule.final=0.98"]
    notes = explain_recipe(load_checked_recipe(path, high))["notes"]
    assert "criterion auto: obd, update none" in notes
    explicit = explain_recipe(load_checked_recipe(path))["notes"]
    assert not any("criterion auto" in n or "damping" in n for n in explicit)


def test_recipe_export_limit_reaches_the_export_and_a_refusal_keeps_the_report(
    tmp_path, monkeypatch
):
    import json
    from pathlib import Path

    import prunekit.recipe_run as recipe_run
    from prunekit.export.modes import QuantizationRefused

    seen = {}

    def refuse(*args, **kwargs):
        seen.update(kwargs)
        raise QuantizationRefused("int8 lost 2.0 points > --max-accuracy-drop 0.5")

    monkeypatch.setattr(recipe_run, "export_model", refuse)
    path = Path(__file__).resolve().parent.parent / "recipes" / "ci-digits-obd.yaml"
    overrides = ["schedule.steps=1", "finetune.final_epochs=0", "analysis.ntk=false",
                 "export.quantize=int8", "export.max_accuracy_drop=0.5"]  # fmt: skip
    recipe = recipe_run.load_checked_recipe(path, overrides)
    with pytest.raises(QuantizationRefused):
        recipe_run.run_recipe(recipe, tmp_path / "run")
    assert seen["max_accuracy_drop"] == 0.5 and seen["quantize"] == "int8"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "lost 2.0 points" in report["export_refused"]


def test_many_classes_default_to_sampled_labels_everywhere():
    many = load_data("synthetic?n=200&dim=8&classes=40")
    torch.manual_seed(0)
    model = mlp("8,12,40")
    result = run_pruning(model, many, PruneSettings(**(BASE | {"steps": 1})))
    assert result.report["fisher_labels"] == "sampled"
    few = run_pruning(copy.deepcopy(mlp("8,12,3")), load_data("synthetic?n=120&dim=8&classes=3"),
                      PruneSettings(**(BASE | {"steps": 1})))  # fmt: skip
    assert few.report["fisher_labels"] == "exact"


@pytest.mark.parametrize(
    ("kw", "mode"),
    [
        ({}, "rows"),  # the auto criterion up to 95%: obs with the rows update
        ({"sparsity": 0.95}, "rows"),
        ({"sparsity": 0.96}, "none"),  # auto is obd above 95%: no update with fine-tuning
        ({"criterion": "obd"}, "none"),
        ({"criterion": "obs"}, "none"),  # only the auto criterion pairs obs with rows
        ({"finetune_epochs": 0.0, "final_epochs": 0.0}, "rows"),
        ({"finetune_epochs": 0.0, "final_epochs": 1.0}, "rows"),
        ({"finetune_epochs": 0.0, "final_epochs": 1.0, "criterion": "obd"}, "none"),
        ({"fisher": "diag"}, "none"),  # auto obs on the diagonal: nothing to solve rows with
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "criterion": "obs"}, "rows"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "criterion": "magnitude"}, "none"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "fisher": "diag"}, "none"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "criterion": "sparsegpt"}, "none"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "structure": "units"}, "none"),
        ({"finetune_epochs": 0.0, "final_epochs": 0.0, "compensate": True}, "summed"),
        ({"update": "joint"}, "joint"),
    ],
)
def test_auto_update_is_rows_for_auto_obs_or_without_any_fine_tuning(kw, mode):
    assert PruneSettings(**kw).update == ("auto" if "update" not in kw else kw["update"])
    assert PruneSettings(**kw).update_mode == mode


def test_auto_update_one_shot_run_applies_and_records_the_rows_update(data, dense):
    kw = dict(finetune_epochs=0.0, final_epochs=0.0, score_examples=60, sparsity=0.8)
    auto = _run(dense, data, **kw)
    assert auto.report["update"] == {
        "mode": "rows", "requested": "auto", "shots": 5, "damping_chosen_on": "validation[0:24]"
    }  # fmt: skip
    plain = _run(dense, data, update="none", **kw)
    assert plain.report["update"] == {"mode": "none", "requested": "none", "shots": 1}
    for row in auto.metrics[1:]:
        assert set(row["update_damping"]) == {"1.weight", "3.weight"}
        assert "loss_after_compensation" in row
    params = dict(auto.model.named_parameters())
    assert all(not params[n][~m].any() for n, m in auto.masks.items())
    chosen = [v for row in auto.metrics[1:] for v in row["update_damping"].values()]
    assert any(v != "none" for v in chosen)  # this model takes the update...
    other = dict(plain.model.named_parameters())
    assert any(not torch.equal(params[n], other[n]) for n in auto.masks)  # ...and it moved


def test_damping_choice_reuses_the_no_update_loss_and_chooses_as_a_full_search(data, dense,
                                                                               monkeypatch):
    """'none' for layer k+1 is the state chosen after layer k: 1 + 3 x layers evaluations,
    and the same choice as evaluating all 4 candidates of every layer afresh."""
    import prunekit.obsupdate as ou
    from prunekit.finetune import evaluate
    from prunekit.prune.masks import apply_masks

    model, task, scored, masks, held, calls = _counted_damping_setup(data, dense, monkeypatch)
    _, choice = ou.choose_damping(model, task, scored.curvature, masks, held, "rows")
    assert len(calls) == 1 + 3 * len(choice)
    # reference: every candidate of every layer evaluated, in forward order
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    cands = {d: ou.rows_update(scored.curvature, params, masks, damping=d) for d in ou.DAMPINGS}
    state = {n: torch.where(~masks[n], -before[n], torch.zeros_like(before[n])) for n in masks}
    want = {}
    for layer in choice:
        bias = layer.replace("weight", "bias")
        losses = {}
        for key in (ou.NONE, *ou.DAMPINGS):
            trial = dict(state)
            if key != ou.NONE:
                trial.update({n: cands[key][n] for n in (layer, bias)})
            probe = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in probe.named_parameters():
                    p.copy_(before[n] + trial.get(n, torch.zeros_like(p)))
            apply_masks(probe, masks)
            losses[key] = float(evaluate(probe, task, held)["loss"])
        want[layer] = min(losses, key=lambda k: (losses[k], k == ou.NONE))
        if want[layer] != ou.NONE:
            state.update({n: cands[want[layer]][n] for n in (layer, bias)})
    assert choice == want


@pytest.mark.parametrize(
    ("kw", "count"),
    [
        ({}, 1),  # fine-tuning: one curvature fit per step
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0}, 10),
        ({"steps": 3, "finetune_epochs": 0.0, "final_epochs": 0.0}, 4),  # ceil(10 / 3)
        ({"steps": 10, "finetune_epochs": 0.0, "final_epochs": 0.0}, 1),
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 1.0}, 1),  # final fine-tune
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0, "update": "none"}, 1),
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0, "update": "rows"}, 10),
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0, "fisher": "diag"}, 1),
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0, "shots": 3}, 3),
        ({"steps": 1, "finetune_epochs": 0.0, "final_epochs": 0.0, "criterion": "magnitude"}, 1),
    ],
)
def test_auto_shots_give_a_run_without_fine_tuning_ten_curvature_fits(kw, count):
    assert PruneSettings(**kw).shot_count == count


def test_auto_shots_score_ten_times_in_a_one_step_run(data, dense, monkeypatch):
    seen = []
    real = loop_module.next_masks

    def spy(scores, masks, target, scope):
        seen.append(target)
        return real(scores, masks, target, scope)

    monkeypatch.setattr(loop_module, "next_masks", spy)
    kw = dict(steps=1, finetune_epochs=0.0, final_epochs=0.0, score_examples=60, sparsity=0.8)
    result = _run(dense, data, **kw)
    assert result.report["update"]["shots"] == 10
    assert seen == pytest.approx([0.08 * j for j in range(1, 11)])


def test_basis_refits_where_explain_says_when_half_the_weights_are_gone(data, monkeypatch):
    """A 10-step run to 90% fits the EKFAC eigenbasis when the kept fraction has halved
    since the last fit, at exactly the steps ``explain`` predicts: 1, 5 and 9 for a large
    model; 1, 4, 7 and 10 for this one's 352 weights, whose rounded counts keep exactly
    0.5, 0.25 and 0.125 at steps 4, 7 and 10."""
    import prunekit.criteria.curvature as curvature_module
    from prunekit.prune.schedules import schedule
    from prunekit.recipe_run import basis_fit_steps

    fitted, real = [], curvature_module.fit_ekfac

    def spy(model, *args, **kwargs):
        fitted.append(curvature_module.kept_fraction(model, args[1]))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(curvature_module, "fit_ekfac", spy)
    torch.manual_seed(0)
    wide = mlp("8,32,3")
    kw = dict(steps=10, sparsity=0.9, finetune_epochs=0.1, final_epochs=0.0, update="none")
    result = _run(wide, data, **kw)
    steps = [row["step"] for row in result.metrics[1:]]
    predicted = basis_fit_steps(schedule(0.9, 10, "exp"), 0.5, 0, total=352)
    assert [k for k, fit in zip(steps, predicted, strict=True) if fit] == [1, 4, 7, 10]
    assert fitted == [1.0, 0.5, 0.25, 0.125]
    large = basis_fit_steps(schedule(0.9, 10, "exp"), 0.5, 0, total=10**6)
    assert [k for k, fit in enumerate(large, start=1) if fit] == [1, 5, 9]
    assert basis_fit_steps(schedule(0.9, 10, "exp"), 0.0, 0) == [True] + [False] * 9
    assert basis_fit_steps(schedule(0.9, 10, "exp"), 0.0, 3) == [i % 3 == 0 for i in range(10)]
