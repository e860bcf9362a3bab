"""The end-of-run summary table names what ran: the update, and no 'fine-tuned' row
for a run that fine-tuned nowhere."""

from __future__ import annotations

import pytest

from prunekit import console


def _report(mode: str, finetune_epochs: float, final_epochs: float) -> dict:
    metrics = {"loss": 0.5, "accuracy": 0.9}
    return {
        "criterion": "obd",
        "update": {"mode": mode, "requested": "auto", "shots": 1},
        "settings": {"finetune_epochs": finetune_epochs, "final_epochs": final_epochs},
        "metrics": {"dense": metrics, "pruned": metrics, "finetuned": metrics},
        "sparsity": {"global": 0.9, "all_parameters": 0.89},
        "params": {"prunable": 1000, "total": 1100},
        "steps": [{}] * 10,
        "seconds": 1.0,
    }


@pytest.mark.parametrize(
    ("mode", "between", "final", "title", "last"),
    [
        ("none", 1.0, 2.0, "prunekit obd -> run", "fine-tuned"),
        ("none", 0.0, 2.0, "prunekit obd -> run", "fine-tuned"),
        ("rows", 0.0, 0.0, "prunekit obd + rows update -> run", "after update"),
        ("none", 0.0, 0.0, "prunekit obd -> run", "final"),
    ],
)
def test_summary_names_the_update_and_the_last_row(mode, between, final, title, last):
    with console.out_console.capture() as cap:
        console.print_summary(_report(mode, between, final), "run")
    text = cap.get()
    assert title in text
    assert last in text
    assert ("fine-tuned" in text) == (last == "fine-tuned")
