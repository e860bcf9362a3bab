"""TokenEncoder: shapes, padding invariance (float32/float64), pre/post norm, arch specs,
pruning targets and example inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.checkpoint import build_model
from prunekit.errors import CheckpointError, ModelError, SettingError
from prunekit.models import TokenEncoder, encoder
from prunekit.prune.targets import find_targets

TINY = {"vocab": 40, "dim": 16, "heads": 2, "layers": 2, "ffn": 24, "max_len": 20}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _model(dtype=torch.float32, **kwargs) -> TokenEncoder:
    torch.manual_seed(0)
    model = encoder(**{**TINY, **kwargs}).eval().to(dtype)
    with torch.no_grad():  # O(1) embeddings so padding leaks would show well above tolerance
        model.tok_embed.weight.normal_()
        model.pos_embed.weight.normal_()
    return model


@pytest.mark.parametrize("classes", [0, 5])
def test_output_shapes_and_layer_names(classes):
    model = _model(classes=classes)
    batch = model.example_inputs(3, 7, torch.Generator().manual_seed(0))
    out = model(**batch)
    assert out.shape == (3, 5 if classes else 16) and out.dtype == torch.float32
    names = dict(model.named_modules())
    for block in ("blocks.0", "blocks.1"):
        for leaf in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.fc1", "ffn.fc2"):
            assert isinstance(names[f"{block}.{leaf}"], nn.Linear)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert ("head" in names) == bool(classes)
    assert model.tok_embed.weight.shape == (40, 16) and model.pos_embed.weight.shape == (20, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_does_not_change_outputs(dtype, norm_first):
    """Each row padded to T=12 with garbage ids gives what the unpadded row gives alone."""
    model = _model(dtype, norm_first=norm_first, classes=3)
    gen = torch.Generator().manual_seed(1)
    lengths = [12, 9, 4, 1]
    ids = torch.randint(1, 40, (4, 12), generator=gen)  # padding holds real-looking ids
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    padded = model(ids, mask)
    alone = torch.cat([model(ids[i : i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(padded, alone, atol=TOL[dtype], rtol=0)
    # the mask really matters: without it the padded rows change
    assert (model(ids)[1:] - alone[1:]).abs().max() > 1e-3
    # left padding: positions count real tokens, so it gives the same outputs too
    left = torch.stack([torch.roll(ids[i], 12 - n) for i, n in enumerate(lengths)])
    left_mask = torch.stack([torch.roll(mask[i], 12 - n) for i, n in enumerate(lengths)])
    torch.testing.assert_close(model(left, left_mask), alone, atol=TOL[dtype], rtol=0)


def test_pre_and_post_norm_differ_and_mask_forms_agree():
    pre, post = _model(norm_first=True), _model(norm_first=False)
    post.load_state_dict(pre.state_dict())
    batch = pre.example_inputs(4, 10, torch.Generator().manual_seed(2))
    assert (pre(**batch) - post(**batch)).abs().max() > 1e-3
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.testing.assert_close(pre(ids, mask.bool()), pre(ids, mask), atol=0, rtol=0)
    torch.testing.assert_close(pre(batch), pre(**batch), atol=0, rtol=0)  # dict positionally
    torch.testing.assert_close(pre(ids), pre(ids, torch.ones_like(ids)), atol=0, rtol=0)


def test_fully_padded_row_is_finite_and_pools_to_zero():
    model = _model()
    ids = torch.randint(1, 40, (3, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6])
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(16))  # classes=0: the pooled embedding
    with_head = _model(classes=3)
    assert torch.equal(with_head(ids, mask)[1], with_head.head.bias.detach())
    # gradients stay finite through a fully padded row
    loss = with_head(ids, mask).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in with_head.parameters() if p.grad is not None)


def test_dropout_only_in_training():
    model = _model(dropout=0.5)
    batch = model.example_inputs(2, 8)
    torch.testing.assert_close(model(**batch), model(**batch), atol=0, rtol=0)
    model.train()
    assert (model(**batch) - model(**batch)).abs().max() > 0


def test_arch_spec_builds_the_encoder():
    model = build_model("prunekit.models:encoder?dim=32&layers=1")
    assert isinstance(model, TokenEncoder) and len(model.blocks) == 1
    assert model.blocks[0].attn.q.weight.shape == (32, 32)
    out = model(**model.example_inputs(2, 16))
    assert out.shape == (2, 32)
    post = build_model("prunekit.models:encoder?dim=8&heads=2&classes=4&norm_first=false")
    assert post.norm_first is False and post.head.out_features == 4
    with pytest.raises(CheckpointError, match="multiple of heads"):
        build_model("prunekit.models:encoder?dim=30&heads=4")


def test_default_targets_are_linear_weights_not_embeddings_or_norms():
    model = _model(classes=3)
    names = list(find_targets(model))
    expected = [
        f"blocks.{i}.{leaf}.weight"
        for i in range(2)
        for leaf in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.fc1", "ffn.fc2")
    ] + ["head.weight"]
    assert names == expected
    assert {t.kind for t in find_targets(model).values()} == {"linear"}
    with_embeddings = find_targets(model, embeddings=True)
    assert {"tok_embed.weight", "pos_embed.weight"} <= set(with_embeddings)
    assert not any("norm" in n or n.endswith("bias") for n in with_embeddings)


def test_example_inputs_are_valid_and_padded():
    model = _model(pad_id=3)
    batch = model.example_inputs(4, 8, torch.Generator().manual_seed(0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert list(batch) == ["input_ids", "attention_mask"]
    assert ids.shape == mask.shape == (4, 8) and ids.dtype == mask.dtype == torch.int64
    assert mask.sum(1).tolist() == [8, 6, 4, 2]  # row 0 unpadded, padding at the end
    assert ((ids == 3) == (mask == 0)).all()  # pad_id exactly on the padding
    assert ids.min() >= 0 and ids.max() < 40
    again = model.example_inputs(4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], ids)
    assert model.example_inputs(1, 1)["attention_mask"].tolist() == [[1]]
    with pytest.raises(SettingError, match="seq 21"):
        model.example_inputs(2, 21)


def test_too_long_or_misshapen_input_raises_model_error():
    model = _model()
    with pytest.raises(ModelError, match="exceeds max_len 20"):
        model(torch.ones(1, 21, dtype=torch.long))
    with pytest.raises(ModelError, match="same shape"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"dim": 10, "heads": 4}, "multiple of heads"), ({"vocab": 1}, "vocab 1"),
     ({"layers": -1}, "layers -1"), ({"dropout": 1.0}, "dropout"),
     ({"pad_id": 40}, "pad_id 40"), ({"norm_first": "yes"}, "norm_first"),
     ({"ffn": 0}, "ffn 0")],
)  # fmt: skip
def test_bad_settings_raise_setting_error(kwargs, needle):
    with pytest.raises(SettingError, match=needle):
        encoder(**{**TINY, **kwargs})
