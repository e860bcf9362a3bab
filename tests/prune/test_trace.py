"""Unit groups found by tracing (prune/trace.py): which entries each unit owns, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from unit_models import build, run

from prunekit.errors import SettingError
from prunekit.models import lstm
from prunekit.prune.groups import Member
from prunekit.prune.targets import find_targets
from prunekit.prune.trace import find_unit_groups, trace_units


def _by_name(model, x):
    t = trace_units(model, x)
    return {g.name: g for g in t.groups}, t.excluded


def test_mlp_neurons_own_their_row_bias_and_the_next_column():
    groups, excluded = _by_name(*build("mlp"))
    assert {n: (g.kind, g.size) for n, g in groups.items()} == {
        "1": ("neuron", 5), "3": ("neuron", 4)}  # fmt: skip
    assert groups["1"].members == (
        Member("1.weight", 0), Member("1.bias", 0), Member("3.weight", 1, "in"))  # fmt: skip
    assert excluded == {"5": "output units of the model"}


def test_cnn_bn_channels_carry_batchnorm_and_flattened_columns():
    groups, excluded = _by_name(*build("cnn"))
    # layers: 0 conv 1 bn 2 relu 3 pool 4 conv 5 bn 6 relu 7 pool 8 flatten 9 fc 10 relu 11 fc
    assert groups["0"].members == (Member("0.weight", 0), Member("1.weight", 0),
                                   Member("1.bias", 0), Member("4.weight", 1, "in"))  # fmt: skip
    # 8x8 pooled twice -> 2x2: a flattened channel feeds 4 consecutive columns of the Linear
    assert groups["4"].members[-1] == Member("9.weight", 1, "in", width=4)
    assert groups["4"].size == 4 and groups["9"].kind == "neuron"
    assert set(excluded) == {"11"}


def test_residual_block_internal_channels_prunable_output_channels_excluded_with_reason():
    groups, excluded = _by_name(*build("res"))
    assert list(groups) == ["c1"]
    assert [m.param for m in groups["c1"].members] == [
        "c1.weight", "c1.bias", "b1.weight", "b1.bias", "c2.weight"]  # fmt: skip
    assert "c2" in excluded and "residual" in excluded["c2"] and "stay" in excluded["c2"]


def test_residual_addition_of_two_producers_is_one_group():
    groups, _ = _by_name(*build("stem"))
    tied = groups["c2+stem"]
    outs = {m.param for m in tied.members if m.role == "out"}
    ins = {m.param for m in tied.members if m.role == "in"}
    assert outs == {"c2.weight", "c2.bias", "b2.weight", "b2.bias", "stem.weight", "stem.bias"}
    assert ins == {"c1.weight", "fc.weight"}  # both readers of the sum, through mean(2, 3)


@pytest.mark.parametrize(("cell", "gates"), [("lstm", 4), ("gru", 3)])
def test_recurrent_hidden_units_take_every_gate_and_the_readers(cell, gates):
    groups, excluded = _by_name(*build(cell))
    assert list(groups) == ["rnn.l0", "rnn.l1"] and excluded == {
        "head": "output units of the model"
    }
    l0 = groups["rnn.l0"]
    assert l0.kind == "hidden" and l0.size == 5
    assert Member("rnn.weight_ih_l0", 0, blocks=gates, stride=5) in l0.members
    assert Member("rnn.weight_hh_l0", 1, "in") in l0.members
    assert Member("rnn.weight_ih_l1", 1, "in") in l0.members
    assert Member("head.weight", 1, "in") in groups["rnn.l1"].members
    assert l0.members[0].index(2).tolist() == [2 + 5 * b for b in range(gates)]


def test_encoder_heads_and_ffn_units():
    model, x = build("encoder")
    groups, excluded = _by_name(model, x)
    heads, ffn = groups["blocks.1.attn:heads"], groups["blocks.1.ffn.fc1"]
    assert (heads.kind, heads.size, ffn.kind, ffn.size) == ("head", 2, "ffn", 6)
    assert Member("blocks.1.attn.v.bias", 0, width=4) in heads.members
    assert Member("blocks.1.attn.o.weight", 1, "in", width=4) in heads.members
    assert heads.members[0].index(1).tolist() == [4, 5, 6, 7]
    assert "head" in excluded and "residual stream" in excluded
    assert len(groups) == 4


def test_targets_limit_the_groups_and_find_unit_groups_is_the_list():
    model, x = build("mlp")
    targets = {k: v for k, v in find_targets(model).items() if k != "3.weight"}
    t = trace_units(model, x, targets)
    assert [g.name for g in t.groups] == ["1"] and "not a pruning target" in t.excluded["3"]
    assert find_unit_groups(model, x) == list(trace_units(model, x).groups)


def test_tracing_leaves_the_model_as_it_was():
    model, x = build("cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_units(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class PickByValue(nn.Module):
    """A custom op that reads the hidden units by data-dependent indexing."""

    def forward(self, h):
        return h[:, h[0].argsort()]  # a permutation chosen by the values


class PickByTensor(nn.Module):
    """Indexing the hidden units with a tensor (a permutation held in a buffer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("order", torch.tensor([5, 4, 3, 2, 1, 0]))

    def forward(self, h):
        return h[:, self.order]


class Mixes(nn.Module):
    def __init__(self, hidden: nn.Module):
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(4, 6), hidden, nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.mid(torch.relu(self.fc1(x))))


class SwapHalves(nn.Module):
    """A reshape that mixes channels: (N, 6) -> (N, 2, 3) -> transpose -> (N, 6)."""

    def forward(self, h):
        return h.reshape(h.shape[0], 2, 3).transpose(1, 2).reshape(h.shape[0], 6)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (Mixes(PickByValue()), ["'mid'", "'fc1'", "argsort", "not understood"]),
        (Mixes(PickByTensor()), ["'mid'", "'fc1'", "data-dependent indexing"]),
        (Mixes(SwapHalves()), ["'mid'", "'fc1'", "mixes the channels"]),
        (Mixes(nn.PReLU(6)), ["'mid'", "PReLU", "not understood"]),
        (Branchy(), ["Branchy", "torch.fx"]),
    ],
)
def test_patterns_that_cannot_be_proven_are_refused_in_one_line_naming_the_layer(model, words):
    with pytest.raises(SettingError) as err:
        trace_units(model.double(), torch.randn(3, 4, dtype=torch.float64))
    message = str(err.value)
    assert "\n" not in message
    assert all(w in message for w in words), message


def test_a_shared_layer_reading_units_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))

    with pytest.raises(SettingError, match=r"'b' is called 2 times \(shared weights\)"):
        trace_units(Twice(), torch.randn(2, 4))


def test_channel_mixing_norm_and_softmax_exclude_with_reasons():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b, self.c = (nn.Linear(4, 5), nn.LayerNorm(5),
                                                 nn.Linear(5, 3), nn.Linear(3, 2))  # fmt: skip

        def forward(self, x):
            return self.c(torch.softmax(self.b(self.norm(self.a(x))), dim=-1))

    t = trace_units(Normed(), torch.randn(2, 4))
    assert t.groups == () and set(t.excluded) == {"a", "b", "c"}
    assert "'norm'" in t.excluded["a"] and "softmax" in t.excluded["b"]


def test_bnlstm_hidden_units_are_refused_naming_the_layer():
    model = lstm(hidden=4, cell="bnlstm")
    with pytest.raises(SettingError, match="layer 'rnn' \\(BNLSTM\\)"):
        trace_units(model, torch.randn(2, 8, 8))


def test_concatenated_branches_feed_offset_columns():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 3, 1), nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)).flatten(1)

    model, x = Cat(), torch.randn(2, 1, 3, 3)
    groups, _ = _by_name(model, x)
    assert groups["a"].members[-1] == Member("c.weight", 1, "in", offset=0)
    assert groups["b"].members[-1] == Member("c.weight", 1, "in", offset=2)
    assert run(model, x).shape == (2, 18)


class Gated(nn.Module):
    """Units scaled by a broadcast (N, 1, H, W) gate, then a spatial reshape and mean."""

    def __init__(self, offset: bool = False, literal: bool = False):
        super().__init__()
        self.a, self.g, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 1, 1), nn.Linear(4, 2)
        self.offset = nn.Parameter(torch.randn(4, 1, 1)) if offset else None
        self.literal = literal

    def forward(self, x):
        h = torch.relu(self.a(x)) * torch.sigmoid(self.g(x))
        if self.offset is not None:
            h = h + self.offset  # a per-channel parameter outside any group: cannot shrink
        channels = 4 if self.literal else h.shape[1]  # a literal breaks once channels go
        return self.fc(h.reshape(h.shape[0], channels, -1).mean(-1))


def test_broadcast_gates_and_spatial_reshapes_carry_units_and_a_raw_parameter_excludes():
    from prunekit.prune.shrink import shrink_model

    model, x = Gated().double().eval(), torch.randn(3, 1, 5, 5, dtype=torch.float64)
    groups, excluded = _by_name(model, x)
    assert list(groups) == ["a"] and groups["a"].members[-1] == Member("fc.weight", 1, "in")
    assert "broadcast" in excluded["g"] and excluded["fc"] == "output units of the model"
    keep = {"a": torch.tensor([True, False, True, False])}
    small = shrink_model(model, list(groups.values()), keep)
    with torch.no_grad():
        model.a.weight[[1, 3]] = 0
        model.a.bias[[1, 3]] = 0
        model.fc.weight[:, [1, 3]] = 0
        assert torch.allclose(small(x), model(x), atol=1e-12) and small.a.out_channels == 2
    groups, excluded = _by_name(Gated(offset=True), x.float())
    assert groups == {} and "'add'" in excluded["a"]
    groups, excluded = _by_name(Gated(literal=True), x.float())
    assert groups == {} and "literal 4 channels" in excluded["a"]


def test_targets_keep_batchnorm_groups_of_target_convs():
    model, x = build("cnn")
    t = trace_units(model, x, find_targets(model))
    assert [g.name for g in t.groups] == ["0", "4", "9"]


def test_a_traced_lstm_reads_units_through_its_input_columns():
    from prunekit.prune.shrink import shrink_model

    class FrontEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.rnn = nn.LSTM(4, 5, batch_first=True, bidirectional=True)
            self.head = nn.Linear(10, 2)

        def forward(self, x):
            out, _ = self.rnn(torch.tanh(self.proj(x)))
            return self.head(out[:, -1])

    model, x = FrontEnd().double().eval(), torch.randn(2, 6, 3, dtype=torch.float64)
    groups, _ = _by_name(model, x)
    assert list(groups) == ["proj"]
    assert {m.param for m in groups["proj"].members if m.role == "in"} == {
        "rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"}  # fmt: skip
    keep = {"proj": torch.tensor([True, False, True, True])}
    small = shrink_model(model, list(groups.values()), keep)
    assert small.rnn.input_size == 3 and small.rnn.bidirectional
    with torch.no_grad():
        model.proj.weight[1] = 0
        model.proj.bias[1] = 0
        assert torch.allclose(small(x), model(x), atol=1e-12)


def test_transposed_sequences_through_conv1d_and_unsqueeze():
    from prunekit.prune.shrink import shrink_model

    class Temporal(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.conv, self.fc = nn.Linear(3, 4), nn.Conv1d(4, 5, 3), nn.Linear(5, 2)

        def forward(self, x):  # x (N, T, 3)
            h = torch.relu(self.inp(x)).transpose(1, 2)  # (N, 4, T): units on dim 1
            h = torch.relu(self.conv(h)).unsqueeze(-1).permute(0, 2, 3, 1)  # (N, T', 1, 5)
            return self.fc(h.squeeze(2).mean(1))

    model, x = Temporal().double().eval(), torch.randn(3, 7, 3, dtype=torch.float64)
    groups, _ = _by_name(model, x)
    assert sorted(groups) == ["conv", "inp"]
    assert groups["conv"].members[-1] == Member("fc.weight", 1, "in")
    keep = {"inp": torch.tensor([False, True, True, True]), "conv": torch.arange(5) % 2 == 0}
    small = shrink_model(model, list(groups.values()), keep)
    with torch.no_grad():
        model.inp.weight[0] = 0
        model.inp.bias[0] = 0
        model.conv.weight[:, 0] = 0
        model.fc.weight[:, [1, 3]] = 0
        assert torch.allclose(small(x), model(x), atol=1e-12)


def test_batchnorm1d_after_a_linear_joins_the_neuron_group():
    from prunekit.prune.shrink import shrink_model

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Dropout(0.1),
                          nn.Linear(5, 2)).double()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    groups, _ = _by_name(model, x)
    assert [m.param for m in groups["0"].members] == ["0.weight", "0.bias", "1.weight",
                                                      "1.bias", "4.weight"]  # fmt: skip
    keep = {"0": torch.tensor([True, False, True, False, True])}
    small = shrink_model(model, list(groups.values()), keep)
    assert small[1].num_features == 3 and small[1].running_mean.shape == (3,)
    with torch.no_grad():
        model[4].weight[:, [1, 3]] = 0  # consumers no longer read units 1 and 3
        assert torch.allclose(small(x), model(x), atol=1e-12)


class Functional(nn.Module):
    """Functional pooling and a keyword call: the units are followed all the same."""

    def __init__(self, indices: bool = False):
        super().__init__()
        self.conv, self.fc, self.indices = nn.Conv2d(1, 4, 3), nn.Linear(4, 2), indices

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        if self.indices:
            h = torch.nn.functional.max_pool2d(h, 1, return_indices=True)[0]
        h = torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(input=h)


def test_functional_pooling_and_keyword_inputs():
    model, x = Functional(), torch.randn(2, 1, 6, 6)
    groups, _ = _by_name(model, x)
    assert groups["conv"].members[-1] == Member("fc.weight", 1, "in")
    with pytest.raises(SettingError, match="max_pool2d_with_indices"):  # a tuple: refused
        trace_units(Functional(indices=True), x)
