"""export_onnx with dict inputs: a pruned TokenEncoder (token ids + attention mask) in every
storage mode, parity on padded batches of another batch size and sequence length."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from prunekit.errors import ModelError, SettingError, VerificationError
from prunekit.export import export_onnx, receipt_table
from prunekit.export.verify import batch_of, feeds, run_torch, session
from prunekit.models import TokenEncoder, encoder

DIM, FFN = 32, 64
PRUNED = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.fc1", "ffn.fc2")


def pruned_encoder(sparsity: float = 0.5, **kwargs) -> tuple[TokenEncoder, dict]:
    """Tiny encoder with ~``sparsity`` of its q/k/v/o/fc1/fc2 weights zeroed (fixed seed)."""
    torch.manual_seed(0)
    settings = {"vocab": 64, "dim": DIM, "heads": 4, "layers": 2, "ffn": FFN, "max_len": 32}
    model = encoder(**{**settings, "classes": 3, **kwargs}).eval()
    gen = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        model.tok_embed.weight.normal_()  # O(1) embeddings: padding leaks would show
        for name, p in model.named_parameters():
            if name.endswith(".weight") and any(f".{leaf}." in name for leaf in PRUNED):
                masks[name] = torch.rand(p.shape, generator=gen) >= sparsity
                p.mul_(masks[name])
    return model, masks


def _inputs(model: TokenEncoder, batch: int, seq: int, seed: int) -> dict:
    return model.example_inputs(batch, seq, torch.Generator().manual_seed(seed))


def _onnx_vs_torch(path, model, inputs) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds(sess, inputs))[0]
    return float(np.abs(got - run_torch(model, inputs)).max())


@pytest.mark.parametrize("storage", ["dense", "sparse", "packed"])
def test_every_mode_has_parity_on_padded_batches(storage, tmp_path):
    model, masks = pruned_encoder()
    example, verify = _inputs(model, 2, 8, 0), _inputs(model, 7, 13, 1)
    assert verify["attention_mask"].sum(1).unique().numel() == 7  # 7 amounts of padding
    path = tmp_path / f"{storage}.onnx"
    r = export_onnx(model, path, example, storage=storage, masks=masks, verify_inputs=verify,
                    latency=False)  # fmt: skip
    v = r["verification"]
    assert v["max_abs_diff"] <= 1e-5 and v["n_inputs"] == 7
    assert r["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert dict(receipt_table(r))["inputs"] == (
        "input_ids int64 [batch, sequence], attention_mask int64 [batch, sequence]"
    )
    assert r["unmatched_weights"] == []
    assert {t["name"] for t in r["tensors"]} == set(masks)
    stored = {t["name"]: t["stored_as"] for t in r["tensors"] if t["name"] in masks}
    # at 50% a sparse tensor (values + int64 indices) is bigger than dense: it stays dense
    assert set(stored.values()) == {"dense" if storage == "sparse" else storage}
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert v["weights"]["zeros"] >= v["weights"]["pruned"] == pruned
    # yet another batch size and sequence length runs, also in a fresh session
    assert _onnx_vs_torch(path, model, _inputs(model, 3, 21, 2)) <= 1e-5


def test_sparse_mode_stores_the_encoder_sparsely_above_break_even(tmp_path):
    model, masks = pruned_encoder(0.8)
    r = export_onnx(model, tmp_path / "s.onnx", _inputs(model, 2, 8, 0), storage="sparse",
                    masks=masks, verify_inputs=_inputs(model, 5, 11, 1), latency=False)  # fmt: skip
    assert r["verification"]["max_abs_diff"] <= 1e-5
    rows = {t["name"]: t["stored_as"] for t in r["tensors"]}
    assert rows["blocks.0.ffn.fc1.weight"] == rows["blocks.1.attn.q.weight"] == "sparse"
    assert len(onnx.load(tmp_path / "s.onnx").graph.sparse_initializer) >= 8


def test_packed_file_is_smaller_than_dense(tmp_path):
    model, masks = pruned_encoder()
    sizes = {}
    for storage in ("dense", "packed"):
        r = export_onnx(model, tmp_path / f"{storage}.onnx", _inputs(model, 2, 8, 0),
                        storage=storage, masks=masks, latency=False)  # fmt: skip
        sizes[storage] = r["bytes"]["file"]
    # measured: packed/dense = 0.86 at 50% (the graph's nodes are a large share of so
    # tiny a model; the pruned weights alone shrink to ~0.63x: uint8 deltas + fp32 values)
    assert sizes["packed"] < 0.92 * sizes["dense"]


def test_bool_mask_keeps_its_dtype_and_dict_order_sets_input_order(tmp_path):
    model, masks = pruned_encoder()
    ex = _inputs(model, 2, 8, 0)
    example = {"attention_mask": ex["attention_mask"].bool(), "input_ids": ex["input_ids"]}
    verify = _inputs(model, 6, 5, 1)  # int64 mask: cast to the graph's bool when fed
    r = export_onnx(model, tmp_path / "b.onnx", example, masks=masks, verify_inputs=verify,
                    latency=False)  # fmt: skip
    assert [(i["name"], i["dtype"]) for i in r["inputs"]] == [
        ("attention_mask", "bool"), ("input_ids", "int64")
    ]  # fmt: skip
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()] == ["tensor(bool)", "tensor(int64)"]
    assert r["verification"]["max_abs_diff"] <= 1e-5


def test_unknown_key_raises_one_line_naming_it(tmp_path):
    model, _ = pruned_encoder()
    example = {**_inputs(model, 2, 8, 0), "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ModelError, match="'token_type_ids'") as info:
        export_onnx(model, tmp_path / "k.onnx", example, latency=False)
    assert "\n" not in str(info.value) and "input_ids" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("example", "verify", "needle"),
    [("dict", "tensor", "keys input_ids, attention_mask"), ("dict", "fewer", "keys"),
     ("tensor", "dict", "a tensor"), ("empty", None, "empty"),
     ("batches", None, "batch size")],
)  # fmt: skip
def test_malformed_inputs_are_refused(example, verify, needle, tmp_path):
    model, _ = pruned_encoder()
    ex = _inputs(model, 2, 8, 0)
    forms = {
        "dict": ex, "tensor": ex["input_ids"], "fewer": {"input_ids": ex["input_ids"]},
        "empty": {}, None: None,
        "batches": {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"][:1]},
    }  # fmt: skip
    with pytest.raises((SettingError, ModelError), match=needle):
        export_onnx(model, tmp_path / "m.onnx", forms[example], verify_inputs=forms[verify],
                    latency=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_cleanup_removes_dead_ffn_units_and_keeps_parity(tmp_path):
    model, masks = pruned_encoder(norm_first=False)
    with torch.no_grad():  # block 0: 6 units without inputs, 4 without outputs
        for rows, name in ((slice(0, 6), "fc1"), (slice(6, 10), "fc2")):
            key = f"blocks.0.ffn.{name}.weight"
            if name == "fc1":
                masks[key][rows] = False
            else:
                masks[key][:, rows] = False
            model.get_parameter(key).mul_(masks[key])
    r = export_onnx(model, tmp_path / "c.onnx", _inputs(model, 2, 8, 0), masks=masks,
                    verify_inputs=_inputs(model, 5, 12, 1), latency=False)  # fmt: skip
    assert r["cleanup"]["actions"] == [
        f"removed 10 of {FFN} units of blocks.0.ffn.fc1 (4 without outgoing weights, "
        "6 without incoming weights, 6 of them folded into the next bias)"
    ]
    assert r["cleanup"]["params_before"] - r["cleanup"]["params_after"] == 10 * (2 * DIM + 1)
    rows = {t["name"]: t["shape"] for t in r["tensors"]}
    assert sorted(rows["blocks.0.ffn.fc1.weight"]) == [DIM, FFN - 10]  # MatMul: transposed
    assert r["verification"]["max_abs_diff"] <= 1e-5
    assert model.blocks[0].ffn.fc1.out_features == FFN  # the caller's model is untouched


def test_int8_weights_on_the_encoder(tmp_path):
    model, masks = pruned_encoder()
    verify = _inputs(model, 16, 10, 1)
    targets = torch.from_numpy(run_torch(model, verify).argmax(-1))
    r = export_onnx(model, tmp_path / "q.onnx", _inputs(model, 2, 8, 0), quantize="int8-weights",
                    masks=masks, verify_inputs=verify, verify_targets=targets,
                    latency=False)  # fmt: skip
    v = r["verification"]
    assert {t["stored_as"] for t in r["tensors"] if t["name"] in masks} == {"packed-int8"}
    assert 0 < v["max_abs_diff"] < 0.1 and v["accuracy_pytorch"] == 1.0
    assert v["accuracy_change"] >= -0.25
    assert v["weights"]["zeros"] >= v["weights"]["pruned"]


def test_latency_and_batch_of_take_dicts(tmp_path):
    model, masks = pruned_encoder(layers=1)
    example = _inputs(model, 2, 8, 0)
    big = batch_of(example, 5)
    assert big["input_ids"].shape == (5, 8)
    assert torch.equal(big["input_ids"][4], example["input_ids"][0])
    r = export_onnx(model, tmp_path / "l.onnx", example, masks=masks)
    assert set(r["latency"]) == {"onnxruntime_packed", "onnxruntime_dense", "pytorch"}
    for runner in r["latency"].values():
        assert runner["batch64"]["p50_ms"] > 0 and runner["batch1"]["p50_ms"] > 0
    sess, _ = session(str(tmp_path / "l.onnx"))
    assert sess.run(None, feeds(sess, big))[0].shape == (5, 3)


class TwoInputs(nn.Module):
    """Embedding of ids (B, T) weighted by a float mask (B, T), summed, then a Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, ids, weights):
        return self.fc((self.emb(ids) * weights.unsqueeze(-1)).sum(1))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_exporters_take_dicts_and_float_masks_follow_the_sequence(exporter, tmp_path):
    """(The encoder itself exports with dynamo too, parity 3e-7, but takes ~7 s.)"""
    torch.manual_seed(0)
    model = TwoInputs().eval()

    def inputs(n, t):
        return {"ids": torch.randint(0, 20, (n, t)), "weights": torch.rand(n, t)}

    r = export_onnx(model, tmp_path / "t.onnx", inputs(1, 5), exporter=exporter,
                    verify_inputs=inputs(4, 7), latency=False)  # fmt: skip
    assert r["exporter"] == exporter and r["verification"]["max_abs_diff"] <= 1e-5
    assert r["inputs"] == [
        {"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "weights", "dtype": "float32", "shape": ["batch", "sequence"]},
    ]
    assert _onnx_vs_torch(tmp_path / "t.onnx", model, inputs(3, 11)) <= 1e-5


def test_float_only_dict_keeps_dim_1_static_and_says_so_at_verification(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, a, b):
            return self.fc(a.flatten(1)) + self.fc(b.flatten(1))

    example = {"a": torch.randn(2, 6), "b": torch.randn(2, 3, 2)}
    r = export_onnx(Pair().eval(), tmp_path / "p.onnx", example, verify_inputs={
        "a": torch.randn(5, 6), "b": torch.randn(5, 3, 2)}, latency=False)  # fmt: skip
    assert [i["shape"] for i in r["inputs"]] == [["batch", 6], ["batch", 3, 2]]
    with pytest.raises(VerificationError, match="cannot run the exported model") as info:
        export_onnx(Pair().eval(), tmp_path / "q.onnx", example, verify_inputs={
            "a": torch.randn(5, 6), "b": torch.randn(5, 2, 3)}, latency=False)  # fmt: skip
    assert "\n" not in str(info.value) and "b (5, 2, 3)" in str(info.value)
    assert not (tmp_path / "q.onnx").exists()
