"""Fine-tuning inside a run (issue 15): lr 'auto' through the CLI, recipes and resume; the
kept-or-rolled-back record of every phase in report.json and metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.checkpoint import load_model
from prunekit.data import load_data
from prunekit.finetune import LR_CANDIDATES
from prunekit.loop import run_pruning
from prunekit.recipe import RecipeError, load_recipe
from prunekit.settings import PruneSettings

FAST = ["--steps", "2", "--finetune-epochs", "0.5", "--final-epochs", "0.5", "--quiet",
        "--score-examples", "100", "--criterion", "magnitude", "--sparsity", "0.8"]  # fmt: skip
PHASE_KEYS = ("finetune_lr", "loss_before_finetune", "finetune_kept", "finetune_kept_iteration",
              "finetune_iterations")  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def test_cli_default_lr_is_auto_and_the_report_records_the_probe(cli, digits_model_file, tmp_path):
    code, _, err = cli("prune", digits_model_file, *FAST, "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ft = report["finetune"]
    assert ft["lr_setting"] == "auto" and ft["lr"] in LR_CANDIDATES
    assert [row["lr"] for row in ft["lr_probe"]["table"]] == list(LR_CANDIDATES)
    assert report["settings"]["lr"] == "auto"
    for step in report["steps"]:
        assert all(k in step for k in PHASE_KEYS) and step["finetune_lr"] == ft["lr"]
        assert step["finetune_kept"] in ("end", "checkpoint", "start")
        assert step["loss_after_finetune"] <= step["loss_before_finetune"]
    assert ft["final"]["loss"] <= ft["final"]["loss_before"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["lr_probe"] == ft["lr_probe"] and "lr_probe" not in rows[2]
    assert "--ntk" in report["ntk"]["note"] and not (tmp_path / "run" / "ntk.jsonl").exists()


def test_cli_fixed_lr_skips_the_probe(cli, digits_model_file, tmp_path):
    code, _, err = cli("prune", digits_model_file, *FAST, "--lr", "2e-3", "--out", tmp_path / "r")
    assert code == 0, err
    ft = json.loads((tmp_path / "r" / "report.json").read_text())["finetune"]
    assert ft["lr"] == 0.002 and ft["lr_setting"] == 0.002 and ft["lr_probe"] is None


@pytest.mark.parametrize("value", ["fast", "-1", "0", "nan", "inf", "1e-3x"])
def test_cli_bad_lr_is_one_line_and_exit_2(cli, digits_model_file, tmp_path, value):
    code, out, err = cli("prune", digits_model_file, *FAST, "--lr", value, "--out", tmp_path / "r")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--lr" in err and "auto" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_help_names_the_auto_default(cli):
    code, out, _ = cli("prune", "--help")
    assert code == 0 and "auto" in out and "--lr" in out


def write(path, text: str):
    path.write_text(text)
    return path


def test_recipe_lr_accepts_auto_and_numbers_and_refuses_words(tmp_path):
    head = "model:\n  example: mlp-digits\n"
    base = head + "finetune:\n  lr: {}\n"
    assert load_recipe(write(tmp_path / "a.yaml", base.format("auto")))["finetune"]["lr"] == "auto"
    assert load_recipe(write(tmp_path / "b.yaml", head))["finetune"]["lr"] == "auto"
    assert load_recipe(write(tmp_path / "c.yaml", base.format("0.003")))["finetune"]["lr"] == 3e-3
    with pytest.raises(RecipeError, match=r"c.yaml:4: finetune.lr = 'fast' must be .*auto"):
        load_recipe(write(tmp_path / "c.yaml", base.format("fast")))
    with pytest.raises(RecipeError, match=r"finetune.lr = -1"):
        load_recipe(write(tmp_path / "c.yaml", base.format("-1")))
    over = load_recipe(write(tmp_path / "d.yaml", base.format("0.1")), ["finetune.lr=auto"])
    assert over["finetune"]["lr"] == "auto"


def test_api_bad_lr_is_refused_before_any_work(digits, digits_model_file):
    from prunekit.errors import SettingError

    model = load_model(digits_model_file).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SettingError, match=r"^lr 'fast' must be 'auto'"):
        run_pruning(model, digits, PruneSettings(lr="fast", ntk=False))
    with pytest.raises(SettingError, match="checkpoints"):
        run_pruning(model, digits, PruneSettings(finetune_checkpoints=0, ntk=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class StopAt:
    def __init__(self, label: str):
        self.label, self.fired = label, False

    def __call__(self, label: str, done: int, total: int) -> None:
        if label == self.label and not self.fired:
            self.fired = True
            raise KeyboardInterrupt(label)


def test_resume_reads_the_probed_rate_back_bit_identically(digits, digits_model_file, tmp_path):
    """Interrupted after step 2 of 3 and resumed, an lr='auto' run does not probe again (its
    weights are another model's by then) and ends bit-identical to a straight run."""
    cfg = PruneSettings(criterion="obd", fisher="ekfac", sparsity=0.85, steps=3, ntk=False,
                        finetune_epochs=0.5, final_epochs=0.5, score_examples=200)  # fmt: skip
    straight = run_pruning(load_model(digits_model_file).model, digits, cfg)
    stop = StopAt("fine-tune step 3")
    with pytest.raises(KeyboardInterrupt):
        run_pruning(load_model(digits_model_file).model, digits, cfg, progress=stop,
                    state_dir=tmp_path)  # fmt: skip
    labels = []
    resumed = run_pruning(load_model(digits_model_file).model, digits, cfg, state_dir=tmp_path,
                          resume=True, progress=lambda lb, d, n: labels.append(lb))  # fmt: skip
    assert "lr probe" not in labels  # the rate came back from the checkpoint's rows
    assert resumed.report["finetune"] == straight.report["finetune"]
    want = straight.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(straight.metrics)


def test_more_checkpoints_per_phase_are_reported(digits, digits_model_file):
    cfg = PruneSettings(criterion="magnitude", sparsity=0.8, steps=2, ntk=False, lr=0.05,
                        finetune_epochs=1, final_epochs=1, finetune_checkpoints=3)  # fmt: skip
    report = run_pruning(load_model(digits_model_file).model, digits, cfg).report
    assert report["finetune"]["checkpoints"] == 3
    for step in report["steps"]:
        assert step["finetune_iterations"] == 15
        assert step["finetune_kept_iteration"] in (0, 5, 10, 15)
        kept = {0: "start", 15: "end"}.get(step["finetune_kept_iteration"], "checkpoint")
        assert step["finetune_kept"] == kept
