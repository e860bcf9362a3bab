"""Issue 15, export: the graph takes the task's inputs through the task's argument mapping,
time-like axes may change length (asked as NAME:DIM, or inferred from padded examples),
parity is verified at another length than the example's, and a file larger than the dense
export is one warning, also in the receipt."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_models import make_mlp, random_masks
from torch import nn

from prunekit.errors import ModelError, SettingError
from prunekit.export import export_onnx, parse_dynamic_axes, receipt_table
from prunekit.export.axes import make_axes, other_length, padded_axes, resized
from prunekit.export.verify import run_torch


def files(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def ort_vs_torch(path, model, x: torch.Tensor) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - run_torch(model, x)).max())


class AudioNet(nn.Module):
    """Conv1d over (N, 1, samples), average over time, Linear: runs at any length."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 8, 5, padding=2), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(-1))


def audio(n: int, samples: int, padded: bool = False, seed: int = 0) -> torch.Tensor:
    """(n, 1, samples) waveforms; padded: each one ends (zeros after) at its own length."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, samples, generator=gen)
    if padded:
        ends = torch.randint(samples // 3, samples + 1, (n,), generator=gen)
        x *= (torch.arange(samples) < ends[:, None, None]).float()
    return x


def pruned_audio() -> tuple[AudioNet, dict]:
    torch.manual_seed(0)
    model = AudioNet().eval()
    masks = random_masks(model, 0.5)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    return model, masks


# ------------------------------------------------------------------ NAME:DIM


def test_parse_dynamic_axes_forms_and_errors():
    assert parse_dynamic_axes(["input:1", ("ids", 1), "input:1"]) == (("input", 1), ("ids", 1))
    assert parse_dynamic_axes("a:b:2") == (("a:b", 2),) and parse_dynamic_axes(None) == ()
    for bad, needle in [
        ("input", "must look like NAME:DIM"), (":1", "must look like NAME:DIM"),
        ("input:0", "axis 0, the batch, is always dynamic"), ("input:-1", "DIM must be"),
        ("input:x", "DIM must be an axis index >= 1"), ("input:1.5", "DIM must be"),
        (("input", True), "DIM must be"), (3, "must look like NAME:DIM"),
    ]:  # fmt: skip
        with pytest.raises(SettingError, match=needle) as info:
            parse_dynamic_axes([bad])
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("audio:2", "no graph input is named 'audio'; inputs: input (N, 1, 40)"),
        ("input:3", "input 'input' (N, 1, 40) has no axis 3; DIM must be 1..2"),
        ("input:0", "axis 0, the batch"),
    ],
)
def test_a_bad_name_or_dim_is_one_line_and_writes_nothing(spec, needle, tmp_path):
    model, _ = pruned_audio()
    with pytest.raises(SettingError) as info:
        export_onnx(model, tmp_path / "a.onnx", audio(4, 40), dynamic_axes=[spec], latency=False)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert files(tmp_path) == set()


def test_helpers_name_groups_and_pick_other_lengths():
    x = {"ids": torch.zeros(2, 6, dtype=torch.long), "feat": torch.zeros(2, 6, 3)}
    axes = make_axes(x, asked={("feat", 2)}, inferred={("ids", 1), ("feat", 1)})
    assert axes.dims == {"ids": {0: "batch", 1: "sequence"},
                         "feat": {0: "batch", 1: "sequence", 2: "sequence_2"}}  # fmt: skip
    assert axes.specs(axes.asked) == ["feat:2"]
    assert other_length(8, 8) == 6 and other_length(8, 6) == 5 and other_length(1, 1) == 2
    assert other_length(2, 1) == 3
    grown = resized(torch.arange(6.0).reshape(1, 1, 6), {("input", 2): 8})
    assert grown.tolist() == [[[0, 1, 2, 3, 4, 5, 5, 5]]]


def test_padding_is_inferred_only_where_examples_end_at_different_places():
    assert padded_axes(audio(16, 30, padded=True)) == {("input", 2)}
    assert padded_axes(audio(16, 30)) == set()  # fixed shapes: nothing inferred
    ids = torch.randint(1, 9, (6, 10)) * (
        torch.arange(10) < torch.tensor([3, 10, 5, 7, 10, 2])[:, None]
    )
    assert padded_axes({"ids": ids}) == {("ids", 1)}
    same = torch.randint(1, 9, (6, 10)) * (torch.arange(10) < 7)  # all padded alike
    assert padded_axes({"ids": same}) == set()
    assert padded_axes(torch.zeros(4, 1, 8, 8)) == set()  # images: never inferred


# ------------------------------------------------------------------ asked and inferred axes


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_asked_axis_runs_at_any_length_with_parity_at_another(exporter, tmp_path):
    model, masks = pruned_audio()
    r = export_onnx(model, tmp_path / "a.onnx", audio(2, 40), masks=masks, exporter=exporter,
                    verify_inputs=audio(12, 40, seed=1), dynamic_axes=["input:2"],
                    latency=False)  # fmt: skip
    assert r["exporter"] == exporter
    assert r["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, "sequence"]}]
    assert r["dynamic_axes"] == {"asked": ["input:2"], "inferred": []}
    other = r["verification"]["other_length"]
    assert other["lengths"] == {"sequence": 30} and other["max_abs_diff"] <= 1e-5
    assert "max abs diff" in dict(receipt_table(r))["at another length"]
    for length in (7, 40, 123):  # a fresh session at lengths the export never saw
        assert ort_vs_torch(tmp_path / "a.onnx", model, audio(3, length, seed=2)) <= 1e-5


def test_padded_examples_infer_the_axis_and_fixed_ones_do_not(tmp_path):
    model, masks = pruned_audio()
    padded = audio(32, 40, padded=True)
    r = export_onnx(model, tmp_path / "p.onnx", padded[:2], masks=masks, verify_inputs=padded,
                    latency=False)  # fmt: skip
    assert r["inputs"][0]["shape"] == ["batch", 1, "sequence"]
    assert r["dynamic_axes"] == {"asked": [], "inferred": ["input:2"]}
    assert r["verification"]["other_length"]["max_abs_diff"] <= 1e-5
    assert ort_vs_torch(tmp_path / "p.onnx", model, audio(2, 55)) <= 1e-5
    fixed = export_onnx(model, tmp_path / "f.onnx", audio(2, 40), masks=masks,
                        verify_inputs=audio(32, 40), latency=False)  # fmt: skip
    assert fixed["inputs"][0]["shape"] == ["batch", 1, 40]
    assert fixed["dynamic_axes"] == {"asked": [], "inferred": []}
    assert "other_length" not in fixed["verification"]


def test_an_inferred_axis_the_model_cannot_take_stays_static(tmp_path, caplog):
    """An MLP over padded (N, 20) rows: the padding looks like a sequence, but the model
    fixes the width; the export stays static and says nothing."""
    torch.manual_seed(0)
    model = make_mlp().eval()
    x = torch.randn(16, 20) * (torch.arange(20) < torch.randint(5, 21, (16, 1)))
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        r = export_onnx(model, tmp_path / "m.onnx", x[:4], verify_inputs=x, storage="dense",
                        latency=False)  # fmt: skip
    assert r["inputs"][0]["shape"] == ["batch", 20] and r["dynamic_axes"]["inferred"] == []
    assert caplog.records == []


class CellSteps(nn.Module):
    """nn.LSTMCell looped over the steps of (N, T, F): the exporter unrolls the loop to T."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def test_an_unrolled_loop_drops_an_inferred_axis_and_refuses_an_asked_one(tmp_path):
    torch.manual_seed(0)
    model = CellSteps().eval()
    x = torch.randn(16, 6, 4) * (torch.arange(6)[None, :, None] < torch.randint(2, 7, (16, 1, 1)))
    r = export_onnx(model, tmp_path / "c.onnx", x[:4], verify_inputs=x, storage="dense",
                    latency=False)  # fmt: skip
    assert r["inputs"][0]["shape"] == ["batch", 6, 4]  # PyTorch ran at 5 steps, the graph not
    assert r["verification"]["max_abs_diff"] <= 1e-5
    with pytest.raises(SettingError) as info:
        export_onnx(model, tmp_path / "d.onnx", x[:4], verify_inputs=x, storage="dense",
                    dynamic_axes=["input:1"], latency=False)  # fmt: skip
    message = str(info.value)
    assert message.startswith("--dynamic-axis input:1: the exported graph does not follow")
    assert "unrolled" in message and "\n" not in message
    assert not (tmp_path / "d.onnx").exists()


def test_an_asked_axis_the_model_cannot_take_is_refused_before_exporting(tmp_path):
    model = make_mlp().eval()
    with pytest.raises(SettingError) as info:
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 20), dynamic_axes=["input:1"],
                    latency=False)  # fmt: skip
    assert "--dynamic-axis input:1: the model does not run at length 15" in str(info.value)
    assert "(the example has 20)" in str(info.value) and files(tmp_path) == set()


# ------------------------------------------------------------------ the task's argument mapping


class Positional(nn.Module):
    """forward(ids, mask) positionally: a dict of keyword arguments does not fit it."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).float()
        return self.fc((self.emb(ids) * m).sum(1) / m.sum(1).clamp_min(1))


def tokens(n: int, length: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ends = torch.randint(1, length + 1, (n, 1), generator=gen)
    mask = (torch.arange(length) < ends).long()
    return {"input_ids": torch.randint(1, 20, (n, length), generator=gen) * mask,
            "attention_mask": mask}  # fmt: skip


def test_the_graph_takes_the_batch_through_the_tasks_mapping(tmp_path):
    torch.manual_seed(0)
    model = Positional().eval()
    x = tokens(24, 9)
    with pytest.raises(ModelError, match="'input_ids' is not an argument of Positional.forward"):
        export_onnx(model, tmp_path / "k.onnx", x, latency=False)

    def feed(m, inputs):  # what the user's task.forward does with a batch's inputs
        return m(inputs["input_ids"], inputs["attention_mask"])

    r = export_onnx(model, tmp_path / "t.onnx", take(x, 3), verify_inputs=x, forward=feed,
                    latency=True)  # fmt: skip
    assert [i["name"] for i in r["inputs"]] == ["input_ids", "attention_mask"]
    assert r["inputs"][0]["shape"] == ["batch", "sequence"]
    assert r["verification"]["max_abs_diff"] <= 1e-5
    assert r["verification"]["other_length"]["lengths"] == {"sequence": 7}
    assert r["latency"]["pytorch"]["batch1"]["p50_ms"] > 0
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    other = tokens(5, 13, seed=3)
    got = sess.run(None, {k: v.numpy() for k, v in other.items()})[0]
    want = run_torch(model, other, feed)
    assert float(np.abs(got - want).max()) <= 1e-5


def take(x: dict, n: int) -> dict:
    return {k: v[:n] for k, v in x.items()}


def test_a_mapping_that_does_not_fit_is_one_line_before_any_export(tmp_path):
    model = Positional().eval()
    with pytest.raises(ModelError) as info:
        export_onnx(model, tmp_path / "t.onnx", tokens(4, 6), latency=False,
                    forward=lambda m, x: m(x["input_ids"]))  # fmt: skip
    message = str(info.value)
    assert message.startswith("Positional cannot run on the example inputs (input_ids (4, 6)")
    assert "mask" in message and "\n" not in message and files(tmp_path) == set()


# ------------------------------------------------------------------ size warning


def test_a_file_larger_than_the_dense_export_is_one_warning_and_in_the_receipt(
    tmp_path, caplog, monkeypatch
):
    """A storage rewrite that grows the file (here: 4 KB of extra bytes) is said once."""
    from onnx import numpy_helper

    from prunekit.export import core

    real = core.apply_storage

    def growing(proto, candidates, storage, quantize):
        rows = real(proto, candidates, storage, quantize)
        proto.graph.initializer.append(numpy_helper.from_array(np.ones(1024, np.float32), "pad"))
        return rows

    monkeypatch.setattr(core, "apply_storage", growing)
    model = make_mlp().eval()
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        r = export_onnx(model, tmp_path / "g.onnx", torch.randn(4, 20),
                        masks=random_masks(model, 0.8), latency=False)  # fmt: skip
    size, dense = r["bytes"]["file"], r["bytes"]["dense_onnx"]
    assert size == (tmp_path / "g.onnx").stat().st_size and size > dense
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert warned == r["warnings"] and len(warned) == 1
    assert warned[0].startswith(f"g.onnx is {size:,} bytes, ") and "the dense export" in warned[0]
    assert "\n" not in warned[0]
    monkeypatch.setattr(core, "apply_storage", real)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        big = make_mlp((64, 64, 4)).eval()
        quiet = export_onnx(big, tmp_path / "q.onnx", torch.randn(4, 64),
                            masks=random_masks(big, 0.9), latency=False)  # fmt: skip
    assert quiet["warnings"] == [] and caplog.records == []
    assert quiet["bytes"]["file"] < min(quiet["bytes"]["dense_onnx"], quiet["bytes"]["dense_fp32"])


def test_size_warning_wording():
    from prunekit.export.receipt import size_warning

    sizes = {"file": 132, "dense_onnx": 120, "dense_fp32": 100}
    line = size_warning("m.onnx", sizes, "sparse", 20)
    assert line.startswith("m.onnx is 132 bytes, 1.10x the dense export of the same graph (120")
    assert "storage 'dense' writes the smaller file" in line and "\n" not in line
    sizes = {"file": 132, "dense_onnx": 140, "dense_fp32": 100}
    line = size_warning("m.onnx", sizes, "packed", 40, repeats=8)
    assert "1.32x the model's dense fp32 weights (100 bytes): 40 of its bytes are the graph" in line
    assert line.endswith("a weight read by 8 nodes: a loop unrolled 8 times")
    assert size_warning("m.onnx", sizes, "dense", 40) is None  # dense: the file is the baseline
    assert size_warning("m.onnx", {**sizes, "file": 90}, "packed", 40) is None


def test_cell_weights_are_default_targets_read_off_their_zeros(tmp_path):
    """Without masks, the zeros of an nn.LSTMCell's weights are pruned entries too (as
    prune's targets count them), so a pruned cell is stored packed."""
    from prunekit.export import default_targets

    torch.manual_seed(0)
    model = CellSteps().eval()
    assert {"cell.weight_ih", "cell.weight_hh", "head.weight"} == set(default_targets(model))
    with torch.no_grad():
        for name in ("cell.weight_ih", "cell.weight_hh"):
            weight = model.get_parameter(name)
            weight.mul_(torch.rand(weight.shape) > 0.8)
    r = export_onnx(model, tmp_path / "c.onnx", torch.randn(4, 6, 4), latency=False)
    rows = {t["name"]: t for t in r["tensors"]}
    assert rows["cell.weight_hh"]["stored_as"] == "packed"
    assert r["verification"]["weights"]["pruned"] > 0 and r["verification"]["max_abs_diff"] <= 1e-5
