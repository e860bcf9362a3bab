"""find_targets: weights of Linear/Conv/recurrent layers, never biases or norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import ModelError
from prunekit.prune.targets import find_targets


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 3, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(6, 3)
        self.rnn = nn.RNN(3, 2, bias=False)
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(5)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2, bias=False))
        self.scale = nn.Parameter(torch.ones(3))  # a loose parameter: not a target


class Custom(nn.Module):
    """Opts one of its parameters in through ``prunable_parameters``."""

    is_recurrent = True

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 3))
        self.gain = nn.Parameter(torch.ones(3))

    def prunable_parameters(self):
        return ("kernel",)


EXPECTED = {
    "lstm.weight_ih_l0": "recurrent",
    "lstm.weight_hh_l0": "recurrent",
    "lstm.weight_ih_l0_reverse": "recurrent",
    "lstm.weight_hh_l0_reverse": "recurrent",
    "lstm.weight_ih_l1": "recurrent",
    "lstm.weight_hh_l1": "recurrent",
    "lstm.weight_ih_l1_reverse": "recurrent",
    "lstm.weight_hh_l1_reverse": "recurrent",
    "gru.weight_ih_l0": "recurrent",
    "gru.weight_hh_l0": "recurrent",
    "rnn.weight_ih_l0": "recurrent",
    "rnn.weight_hh_l0": "recurrent",
    "conv1.weight": "conv",
    "conv2.weight": "conv",
    "conv3.weight": "conv",
    "head.0.weight": "linear",
    "head.2.weight": "linear",
}


def test_default_targets_are_exactly_the_layer_weights():
    model = Zoo()
    targets = find_targets(model)
    assert {n: t.kind for n, t in targets.items()} == EXPECTED
    params = dict(model.named_parameters())
    for name, t in targets.items():
        assert t.name == name
        assert t.shape == tuple(params[name].shape)
        assert t.numel == params[name].numel()
        assert name.startswith(t.module + ".")
    # in named_parameters order
    order = [n for n, _ in model.named_parameters() if n in targets]
    assert list(targets) == order


def test_biases_and_norm_parameters_are_never_targets():
    targets = find_targets(Zoo(), embeddings=True)
    for name in targets:
        assert "bias" not in name
        assert not name.startswith(("bn.", "ln.", "gn.")) and name != "scale"
    with pytest.raises(ModelError):
        find_targets(Zoo(), include=("*bias*", "bn.*", "ln.*"))


def test_embeddings_are_opt_in():
    assert "emb.weight" not in find_targets(Zoo())
    targets = find_targets(Zoo(), embeddings=True)
    assert targets["emb.weight"].kind == "embedding"
    assert list(targets)[0] == "emb.weight"


def test_include_and_exclude_globs():
    model = Zoo()
    assert set(find_targets(model, include=("conv*",))) == {
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
    }
    assert set(find_targets(model, include=("head.*", "gru.*"))) == {
        "head.0.weight",
        "head.2.weight",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
    }
    excluded = find_targets(model, exclude=("lstm.*", "*_hh_*"))
    assert set(excluded) == set(EXPECTED) - {
        n for n in EXPECTED if n.startswith("lstm.") or "_hh_" in n
    }
    both = find_targets(model, include=("conv*",), exclude=("conv2.*",))
    assert set(both) == {"conv1.weight", "conv3.weight"}
    # patterns are case-sensitive and anchored
    with pytest.raises(ModelError):
        find_targets(model, include=("CONV*",))
    with pytest.raises(ModelError):
        find_targets(model, include=("weight",))


def test_custom_module_opts_in_through_prunable_parameters():
    model = nn.Sequential(Custom(), nn.Linear(3, 2))
    targets = find_targets(model)
    assert {n: t.kind for n, t in targets.items()} == {
        "0.kernel": "recurrent",
        "1.weight": "linear",
    }
    assert targets["0.kernel"].module == "0"


def test_bare_linear_module_is_its_own_target():
    targets = find_targets(nn.Linear(4, 2))
    assert list(targets) == ["weight"] and targets["weight"].module == ""


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()),
        nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)),
        nn.Sequential(nn.ReLU()),
    ],
)
def test_model_without_targets_raises_model_error(model):
    with pytest.raises(ModelError, match="no prunable weights"):
        find_targets(model)


def test_exclude_everything_raises_and_names_the_patterns():
    with pytest.raises(ModelError, match=r"\*weight\*"):
        find_targets(Zoo(), exclude=("*weight*",))


def test_targets_of_a_loaded_torchscript_model(tmp_path):
    from prunekit.checkpoint import load_model

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    loaded = load_model(path).model
    targets = find_targets(loaded)
    assert {n: t.kind for n, t in targets.items()} == {"0.weight": "conv", "2.weight": "linear"}


def test_a_tied_head_is_a_target_under_its_parameter_name():
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    targets = find_targets(Tied())
    assert list(targets) == ["embed.weight"] and targets["embed.weight"].kind == "other"
    both = find_targets(Tied(), embeddings=True)
    assert list(both) == ["embed.weight"]


def test_rnn_cells_are_recurrent_targets():
    """nn.LSTMCell/GRUCell/RNNCell looped by a user's forward (issue 15: `--include
    'vad.lstm_cell.*'` found "no prunable weights")."""

    class Vad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm_cell = nn.LSTMCell(3, 4)
            self.gru_cell = nn.GRUCell(3, 4, bias=False)
            self.rnn_cell = nn.RNNCell(3, 4, nonlinearity="relu")

    model = nn.Sequential()
    model.add_module("vad", Vad())
    targets = find_targets(model)
    cells = ("lstm_cell", "gru_cell", "rnn_cell")
    assert {n: t.kind for n, t in targets.items()} == {
        f"vad.{c}.{w}": "recurrent" for c in cells for w in ("weight_ih", "weight_hh")
    }
    assert targets["vad.lstm_cell.weight_ih"].shape == (16, 3)
    assert targets["vad.gru_cell.weight_hh"].module == "vad.gru_cell"
    only = find_targets(model, include=("vad.lstm_cell.*",))
    assert list(only) == ["vad.lstm_cell.weight_ih", "vad.lstm_cell.weight_hh"]  # no biases
