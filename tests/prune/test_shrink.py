"""Shrinking (prune/shrink.py): the smaller model equals the zeroed model and the original
with the removed units' outputs zeroed by hooks (float64), and exports smaller ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from unit_models import MODELS, build, run

from prunekit.errors import SettingError
from prunekit.prune.groups import unit_param_masks
from prunekit.prune.shrink import check_keep, shrink_model
from prunekit.prune.trace import find_unit_groups

# where each group's units are read, to zero them with a hook on the ORIGINAL model:
# (module, 'out' = zero its output channels / 'in' = zero its input channels, channel axis,
# entries per unit). Activations after the producer map 0 to 0, so zeroing there is exact.
HOOKS = {
    "mlp": {"1": [("2", "out", -1, 1)], "3": [("4", "out", -1, 1)]},
    "cnn": {"0": [("2", "out", 1, 1)], "4": [("6", "out", 1, 1)], "9": [("10", "out", -1, 1)]},
    "res": {"c1": [("b1", "out", 1, 1)]},
    "stem": {"c1": [("b1", "out", 1, 1)], "c2+stem": [("stem", "out", 1, 1), ("b2", "out", 1, 1)]},
    "encoder": {
        f"blocks.{i}.{part}": [(f"blocks.{i}.{reader}", "in", -1, width)]
        for i in range(2)
        for part, reader, width in (("attn:heads", "attn.o", 4), ("ffn.fc1", "ffn.fc2", 1))
    },
}


def _keep(groups, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        mask = torch.rand(group.size, generator=g) < p
        mask[int(torch.randint(group.size, (1,), generator=g))] = True  # never empty
        keep[group.name] = mask
    return keep


def _zeroed(model, groups, keep):
    z = copy.deepcopy(model)
    params = dict(z.named_parameters())
    masks = unit_param_masks(groups, keep, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return z


def _hooked_output(model, x, name, keep):
    handles = []
    modules = dict(model.named_modules())
    for group, places in HOOKS[name].items():
        for module, where, axis, width in places:
            gone = (~keep[group]).repeat_interleave(width)

            def zero(t, gone=gone, axis=axis):
                shape = [1] * t.dim()
                shape[axis] = -1
                return t * (~gone).to(t.dtype).reshape(shape)

            if where == "out":
                h = modules[module].register_forward_hook(lambda m, i, o, z=zero: z(o))
            else:
                h = modules[module].register_forward_pre_hook(lambda m, i, z=zero: (z(i[0]),))
            handles.append(h)
    try:
        return run(model, x)
    finally:
        for h in handles:
            h.remove()


def _recurrent_reference(model, x, keep):
    """Float64 nn.LSTM/GRU unrolled by hand with each layer's removed hidden units forced to
    0 after every step; then the head on the last step."""
    rnn, out = model.rnn, x
    for layer in range(rnn.num_layers):
        w_ih, w_hh = (getattr(rnn, f"weight_{k}_l{layer}") for k in ("ih", "hh"))
        b_ih, b_hh = (getattr(rnn, f"bias_{k}_l{layer}") for k in ("ih", "hh"))
        alive = keep[f"rnn.l{layer}"].to(x.dtype)
        h = c = x.new_zeros(x.shape[0], rnn.hidden_size)
        steps = []
        for t in range(out.shape[1]):
            gi, gh = out[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if isinstance(rnn, nn.LSTM):
                i, f, g, o = (gi + gh).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                (ir, iz, inn), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(inn + r * hn) + z * h
            h = h * alive
            steps.append(h)
        out = torch.stack(steps, 1)
    return model.head(out[:, -1])


@pytest.mark.parametrize("name", MODELS)
def test_shrunk_equals_zeroed_equals_hooked_original(name):
    model, x = build(name)
    groups = find_unit_groups(model, x)
    keep = _keep(groups)
    small = shrink_model(model, groups, keep)
    with torch.no_grad():
        zeroed = run(_zeroed(model, groups, keep), x)
        shrunk = run(small, x)
        if name in ("lstm", "gru"):
            hooked = _recurrent_reference(model, x, keep)
        else:
            hooked = _hooked_output(model, x, name, keep)
        dense = run(model, x)
    assert torch.allclose(shrunk, zeroed, rtol=0, atol=1e-6)
    assert torch.allclose(hooked, zeroed, rtol=0, atol=1e-6)
    assert not torch.allclose(dense, zeroed, atol=1e-6)  # the removal did change the output
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < n_before
    assert small.state_dict().keys() == model.state_dict().keys()  # same names, new shapes


def test_shapes_shrink_as_expected_on_the_bn_cnn():
    model, x = build("cnn")
    groups = find_unit_groups(model, x)
    keep = {"0": torch.tensor([True, False, True]), "4": torch.tensor([False, True, True, False]),
            "9": torch.tensor([True, True, False, False, True])}  # fmt: skip
    small = shrink_model(model, groups, keep)
    assert small[0].weight.shape == (2, 1, 3, 3) and small[0].out_channels == 2
    assert small[1].running_mean.shape == (2,) and small[1].num_features == 2
    assert small[4].weight.shape == (2, 2, 3, 3) and small[4].in_channels == 2
    assert small[9].weight.shape == (3, 8) and small[9].in_features == 8  # 2 channels x 2x2
    assert small[11].weight.shape == (10, 3)
    # the kept entries are the original ones
    assert torch.equal(small[4].weight, model[4].weight[[1, 2]][:, [0, 2]])
    assert torch.equal(small[1].running_var, model[1].running_var[[0, 2]])


def test_encoder_heads_and_recurrent_sizes_are_updated():
    model, x = build("encoder")
    groups = find_unit_groups(model, x)
    keep = {g.name: torch.arange(g.size) != 0 for g in groups}
    small = shrink_model(model, groups, keep)
    attn = small.blocks[0].attn
    assert attn.heads == 1 and attn.q.weight.shape == (4, 8) and attn.o.weight.shape == (8, 4)
    assert small.blocks[1].ffn.fc1.out_features == 5 and small.blocks[1].ffn.fc2.in_features == 5
    model, x = build("lstm")
    groups = find_unit_groups(model, x)
    keep = {
        "rnn.l0": torch.tensor([1, 0, 1, 1, 0]).bool(),
        "rnn.l1": torch.tensor([1, 0, 0, 0, 0]).bool(),
    }
    small = shrink_model(model, groups, keep)
    # one nn.LSTM holds one hidden size: layer 1 keeps 2 zeroed units as padding
    assert small.rnn.hidden_size == 3 and small.rnn.weight_ih_l0.shape == (12, 8)
    assert small.head.weight.shape == (10, 3)
    assert torch.allclose(run(small, x), run(_zeroed(model, groups, keep), x), atol=1e-12)


def test_emptying_a_group_is_refused_in_one_line_and_the_model_is_untouched():
    model, x = build("mlp")
    groups = find_unit_groups(model, x)
    keep = {"1": torch.ones(5, dtype=torch.bool), "3": torch.zeros(4, dtype=torch.bool)}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SettingError, match=r"removing all 4 units of '3' would empty layer 3"):
        shrink_model(model, groups, keep)
    with pytest.raises(SettingError, match="expected \\(5,\\)"):
        check_keep(groups, {"1": torch.ones(4, dtype=torch.bool), "3": torch.ones(4).bool()})
    small = shrink_model(model, groups, {**keep, "3": torch.arange(4) < 2})
    assert small is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_export_of_the_shrunk_model_is_smaller_and_matches(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from prunekit.export import export_onnx

    model, x = build(name)
    groups = find_unit_groups(model, x)
    small = shrink_model(model, groups, _keep(groups, seed=3)).float().eval()
    xf = x.float()
    receipt = export_onnx(small, tmp_path / "s.onnx", xf, storage="dense", latency=False,
                          cleanup=False)  # fmt: skip
    assert receipt["verification"]["max_abs_diff"] <= 1e-5  # export_onnx verified parity
    # the exporter renames (and folds BatchNorm into the convs), so compare shapes
    shapes = {i.name: tuple(i.dims) for i in onnx.load(tmp_path / "s.onnx").graph.initializer}
    layers = [m for m in small.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sorted(tuple(m.weight.shape) for m in layers) == sorted(
        s for s in shapes.values() if len(s) >= 2
    )
    big = {tuple(p.shape) for p in model.parameters()}
    assert any(s not in big for s in shapes.values())  # smaller shapes reached the file
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: xf.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), small(xf), atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "lstm", "encoder"])
def test_keep_read_off_the_zeros_recovers_the_removed_units(name):
    from prunekit.prune.shrink import keep_from_zeros

    model, x = build(name)
    groups = find_unit_groups(model, x)
    keep = _keep(groups, seed=5)
    zeroed = _zeroed(model, groups, keep)
    found = keep_from_zeros(zeroed, groups)
    assert all(torch.equal(found[g.name], keep[g.name]) for g in groups)
    with torch.no_grad():
        assert torch.allclose(
            run(shrink_model(zeroed, groups, found), x), run(zeroed, x), atol=1e-12
        )
    # a group whose readers are all zero keeps one unit instead of emptying its layer
    with torch.no_grad():
        for m in groups[0].members:
            if m.role == "in":
                dict(zeroed.named_parameters())[m.param].zero_()
    assert keep_from_zeros(zeroed, groups)[groups[0].name].tolist() == [True] + [False] * (
        groups[0].size - 1
    )
