"""Issue 15 through the CLI: `prune --export` of a model whose forward takes (ids, mask)
positionally (the task's mapping feeds the graph, the sequence axis is inferred from the
padded data, missing folders are made), and an nn.LSTMCell model whose exporter output goes
to <out>.log while the terminal gets one `note:` line per warning."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import prunekit.export.exporters as exporters_mod
from prunekit.checkpoint import ARCH_KEY
from prunekit.prune.state import save_tensors

MODULE = "pk_issue15_models"
SOURCE = '''
import torch
from torch import nn


class Positional(nn.Module):
    """Token classifier whose forward takes (ids, mask) positionally."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).float()
        h = (self.emb(ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def positional():
    return Positional()


class Task:
    """What a user writes: the batch's dict entries become positional arguments."""

    def forward(self, model, batch):
        inputs = batch[0] if isinstance(batch, tuple) else batch
        return model(inputs["input_ids"], inputs["attention_mask"])

    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1])


def task():
    return Task()


class CellRows(nn.Module):
    """Digits (N, 1, 8, 8): an nn.LSTMCell looped over the 8 rows, then a Linear."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(8, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1, 2)
        h = c = x.new_zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def cell_rows():
    return CellRows()
'''
TOKENS = "synthetic?task=tokens&n=300&seq=12&vocab=32&classes=4"
PRUNE = [
    "--criterion", "magnitude", "--sparsity", "0.5", "--steps", "1", "--finetune-epochs", "0.2",
    "--final-epochs", "0", "--no-ntk", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The helper module importable for the whole module; removed from sys.modules after."""
    folder = tmp_path_factory.mktemp("issue15_models")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(folder))
    sys.modules.pop(MODULE, None)
    import importlib

    yield importlib.import_module(MODULE), folder
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def positional_run(models, tmp_path_factory, cli):
    module, _ = models
    tmp = tmp_path_factory.mktemp("positional")
    torch.manual_seed(0)
    ckpt = tmp / "pos.safetensors"
    meta = {ARCH_KEY: f"{MODULE}:positional", "prunekit.data": TOKENS}
    save_tensors(ckpt, module.positional().state_dict(), meta)
    export = tmp / "exports" / "v1" / "pos.onnx"  # folders that do not exist yet
    code, stdout, stderr = cli(
        "prune", ckpt, *PRUNE, "--task", f"{MODULE}:task", "--trust-code", "--out", tmp / "run",
        "--export", export,
    )  # fmt: skip
    return {"code": code, "stdout": stdout, "stderr": stderr, "tmp": tmp, "export": export}


def test_positional_forward_exports_through_the_task(positional_run, models):
    run = positional_run
    assert run["code"] == 0, run["stderr"]
    assert "Traceback" not in run["stderr"]
    export = run["export"]
    assert sorted(p.name for p in export.parent.iterdir()) == ["pos.onnx", "pos.onnx.json"]
    receipt = json.loads(Path(f"{export}.json").read_text())
    assert receipt["path"] == str(export)
    assert [i["name"] for i in receipt["inputs"]] == ["input_ids", "attention_mask"]
    assert all(i["shape"] == ["batch", "sequence"] for i in receipt["inputs"])
    assert receipt["dynamic_axes"]["inferred"] == ["input_ids:1", "attention_mask:1"]
    ver = receipt["verification"]
    assert ver["max_abs_diff"] <= 1e-5 and ver["other_length"]["max_abs_diff"] <= 1e-5
    assert ver["other_length"]["lengths"] == {"sequence": 9}
    # the pruned model through the task equals the graph, at a length no check used
    from prunekit.checkpoint import load_model

    model = load_model(run["tmp"] / "run" / "model.safetensors", arch=f"{MODULE}:positional")
    model = model.model.eval()
    ids = torch.randint(1, 32, (5, 17))
    mask = (torch.arange(17) < torch.tensor([[17], [3], [9], [1], [12]])).long()
    sess = ort.InferenceSession(str(export), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": (ids * mask).numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = (
            models[0]
            .task()
            .forward(model, ({"input_ids": ids * mask, "attention_mask": mask}, None))
        )
    assert float(np.abs(got - want.numpy()).max()) <= 1e-5


def test_export_command_takes_the_task_too(positional_run, tmp_path, cli):
    ckpt = positional_run["tmp"] / "run" / "model.safetensors"
    args = ["export", ckpt, "--out", tmp_path / "e.onnx", "--arch", f"{MODULE}:positional"]
    code, _, stderr = cli(*args, "--data", TOKENS)
    assert code == 2 and "unexpected keyword argument 'input_ids'" in stderr
    axes = ["--dynamic-axis", "input_ids:1", "--dynamic-axis", "attention_mask:1"]
    code, _, stderr = cli(*args, "--data", TOKENS, "--task", f"{MODULE}:task", *axes)
    assert code == 0, stderr
    receipt = json.loads((tmp_path / "e.onnx.json").read_text())
    assert receipt["dynamic_axes"] == {"asked": ["input_ids:1", "attention_mask:1"], "inferred": []}


def _cell_checkpoint(module, tmp: Path) -> Path:
    torch.manual_seed(0)
    path = tmp / "cell.safetensors"
    meta = {ARCH_KEY: f"{MODULE}:cell_rows", "prunekit.data": "digits"}
    save_tensors(path, module.cell_rows().state_dict(), meta)
    return path


def _ir_dump_then_fail(net, x, opset, axes):
    """The torchscript exporter as the issue saw it: ~780 lines of IR on fd 1, then failing."""
    os.write(
        1, "".join(f"  %{i} : Float(*, 16) = onnx::Gemm(%x, %w)\n" for i in range(780)).encode()
    )
    raise RuntimeError("ONNX export failed on an operator with unrecognized namespace")


def test_lstm_cell_export_notes_in_one_line_each_and_logs_the_rest(
    models, tmp_path, cli, capfd, monkeypatch
):
    ckpt = _cell_checkpoint(models[0], tmp_path)
    out = tmp_path / "onnx" / "cell.onnx"
    code, stdout, stderr = cli("export", ckpt, "--out", out, "--trust-code")
    assert code == 0, stderr
    receipt = json.loads(Path(f"{out}.json").read_text())
    assert receipt["exporter"] == "torchscript" and receipt["exporter_fallback"] is None
    notes = stderr.splitlines()
    assert len(notes) == 1 and notes == [f"note: {receipt['warnings'][0]}"], stderr
    assert "dense fp32 weights" in notes[0] and "a loop unrolled 8 times" in notes[0]
    assert receipt["bytes"]["ratio"] > 1
    assert capfd.readouterr() == ("", "")

    real_ts = exporters_mod._RUNNERS["torchscript"]
    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", _ir_dump_then_fail)
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", real_ts)  # fast stand-in
    code, stdout, stderr = cli("export", ckpt, "--out", out, "--overwrite", "--trust-code")
    assert code == 0, stderr
    assert capfd.readouterr() == ("", "")  # not one IR line on the terminal
    receipt = json.loads(Path(f"{out}.json").read_text())
    log = Path(f"{out}.log")
    assert receipt["exporter"] == "dynamo" and receipt["exporter_log"] == str(log)
    assert receipt["exporter_fallback"].startswith("the torchscript exporter failed (RuntimeError")
    assert log.read_text().count("onnx::Gemm") == 780
    lines = stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("note: ") for line in lines), stderr
    assert lines[0].startswith("note: exported with dynamo: the torchscript exporter failed")
    assert lines[0].endswith(f"exporter output in {log}")
    assert "Traceback" not in stderr + stdout and "WARNING" not in stderr
    assert "exporter fallback" in stdout and "exporter log" in stdout  # the receipt table
