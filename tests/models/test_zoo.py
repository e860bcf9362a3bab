"""The model zoo: MLP and CNN factories and the examples' arch specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.checkpoint import build_model
from prunekit.errors import CheckpointError, SettingError
from prunekit.models import ACTIVATIONS, EXAMPLES, cnn, mlp
from prunekit.prune.targets import find_targets


@pytest.mark.parametrize(
    ("sizes", "shape"),
    [("784,300,100,10", (1, 28, 28)), ([64, 10], (64,)), ((8, 5, 3), (2, 2, 2)), ("6,4", (6,))],
)
def test_mlp_output_shape_and_layers(sizes, shape):
    model = mlp(sizes)
    out = model(torch.randn(3, *shape))
    widths = [int(v) for v in (sizes.split(",") if isinstance(sizes, str) else sizes)]
    assert out.shape == (3, widths[-1])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(
        zip(widths[:-1], widths[1:], strict=True)
    )
    # one activation between consecutive Linear layers, none after the last
    assert not isinstance(model[-1], tuple(ACTIVATIONS.values()))
    assert len(find_targets(model)) == len(widths) - 1


def test_paper_mlp_has_the_paper_weight_count():
    model = mlp("784,300,100,10", act="tanh")
    targets = find_targets(model)
    assert sum(t.numel for t in targets.values()) == 266_200
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations(act):
    model = mlp("4,5,2", act=act)
    assert isinstance(model[2], ACTIVATIONS[act])


@pytest.mark.parametrize(
    ("kwargs", "shape", "classes", "n_conv"),
    [
        ({}, (1, 28, 28), 10, 2),
        ({"image_size": 8, "channels": "16,32", "hidden": 64}, (1, 8, 8), 10, 2),
        ({"in_channels": 3, "image_size": 9, "channels": [4], "classes": 5}, (3, 9, 9), 5, 1),
        ({"image_size": 8, "channels": "2,3,4", "act": "tanh"}, (1, 8, 8), 10, 3),
    ],
)
def test_cnn_output_shape(kwargs, shape, classes, n_conv):
    model = cnn(**kwargs)
    assert model(torch.randn(2, *shape)).shape == (2, classes)
    kinds = [t.kind for t in find_targets(model).values()]
    assert kinds == ["conv"] * n_conv + ["linear"] * 2


@pytest.mark.parametrize(
    "sizes", ["784", "a,b", "10,0,3", "10,-2", "", [], [5], "1.5,2", [3, None]]
)
def test_bad_mlp_sizes_raise(sizes):
    with pytest.raises(SettingError, match="sizes"):
        mlp(sizes)


def test_bad_activation_names_valid_ones():
    with pytest.raises(SettingError) as info:
        mlp("4,5,2", act="swish")
    assert "'swish'" in str(info.value)
    assert all(a in str(info.value) for a in ACTIVATIONS)
    with pytest.raises(SettingError, match="swish"):
        cnn(act="swish")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 2, "channels": "4,4"},
        {"channels": "0"},
        {"channels": "x"},
    ],
)
def test_bad_cnn_settings_raise(kwargs):
    with pytest.raises(SettingError):
        cnn(**kwargs)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_arch_builds_and_fits_its_data_shape(name):
    from prunekit.data import check_data_fits, load_data

    ex = EXAMPLES[name]
    model = build_model(ex.arch)
    if ex.data in ("digits", "mnist5k"):
        size = 8 if ex.data == "digits" else 28
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    else:  # token data: the example's own spec, dict inputs
        data = load_data(ex.data)
        assert check_data_fits(model, data).shape == (2, data.num_classes)
    assert ex.epochs > 0 and ex.lr > 0 and ex.description


def test_arch_spec_reaches_the_factory():
    model = build_model("prunekit.models:mlp?sizes=5,7,2&act=relu")
    assert isinstance(model[2], nn.ReLU) and model[1].out_features == 7
    with pytest.raises(CheckpointError, match="swish"):
        build_model("prunekit.models:mlp?sizes=5,7,2&act=swish")


@pytest.mark.parametrize("bn", [1, True])
def test_cnn_bn_option_puts_batchnorm_between_conv_and_activation(bn):
    model = cnn(image_size=8, channels="3,4", hidden=5, bn=bn)
    kinds = [type(m).__name__ for m in model]
    assert kinds[:8] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    assert all(m.bias is None for m in model if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # BN parameters are never targets: the same two convs and two Linears as without bn
    assert [t.kind for t in find_targets(model).values()] == ["conv"] * 2 + ["linear"] * 2
    built = build_model("prunekit.models:cnn?image_size=8&channels=3,4&bn=1")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in built) == 2


def test_cnn_without_bn_is_unchanged_and_bad_bn_is_refused():
    plain = cnn(image_size=8, channels="3", hidden=5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain)
    assert plain[0].bias is not None
    with pytest.raises(SettingError, match="bn 2"):
        cnn(bn=2)
