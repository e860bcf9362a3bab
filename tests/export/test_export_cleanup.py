"""BatchNorm folding and dead-unit removal: same outputs, physically smaller models."""

from __future__ import annotations

import copy

import pytest
import torch
from export_models import make_cnn, make_mlp, random_masks
from torch import nn

from prunekit.export import export_onnx
from prunekit.export.cleanup import bake_masks, fold_batchnorm, remove_dead_units


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_fold_batchnorm_conv_and_linear_exact():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    for net, x in ((make_cnn(), torch.randn(4, 1, 6, 6)), (lin, torch.randn(7, 6))):
        bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d))
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.3, 3)
        net.eval()
        folded = copy.deepcopy(net)
        actions, skipped = fold_batchnorm(folded)
        assert len(actions) == 1 and skipped == []
        assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=0)


def test_batchnorm_without_running_stats_is_kept_and_said():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    actions, skipped = fold_batchnorm(net)
    assert actions == [] and "running statistics" in skipped[0]
    assert isinstance(net[1], nn.BatchNorm1d)


def _dead_mlp(act):
    torch.manual_seed(0)
    net = make_mlp((10, 12, 8, 3), act=act).eval()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()
             if n.endswith("weight")}  # fmt: skip
    masks["0.weight"][[1, 4]] = False  # incoming-dead units 1, 4 of layer 0
    masks["2.weight"][:, [0, 7]] = False  # outgoing-dead units 0, 7 of layer 0
    masks["4.weight"][:, 5] = False  # outgoing-dead unit 5 of layer 2
    bake_masks(net, masks)
    with torch.no_grad():
        net[0].bias[1], net[0].bias[4] = -0.7, 0.9  # relu: 0 and 0.9; tanh: both non-zero
    return net, masks


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_dead_units_removed_with_identical_outputs(act):
    net, masks = _dead_mlp(act)
    x = torch.randn(32, 10)
    small = copy.deepcopy(net)
    actions, skipped = remove_dead_units(small, masks)
    assert skipped == [] and actions
    # layer 0 loses units 0, 1, 4, 7 (unit 4 folded into the next bias); layer 2 loses unit 5
    assert small[0].out_features == 8 and small[2].in_features == 8
    assert small[2].out_features == 7 and small[4].in_features == 7
    assert _params(small) < _params(net)
    assert masks["0.weight"].shape == small[0].weight.shape
    assert masks["2.weight"].shape == small[2].weight.shape
    torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=0)


def test_constant_unit_before_padded_conv_is_skipped_and_said():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight[2] = 0
        net[0].bias[2] = 0.5  # channel 2 is the constant tanh(0.5), padding makes borders 0
    before = _params(net)
    x = torch.randn(2, 2, 8, 8)
    want = net(x)
    actions, skipped = remove_dead_units(net, {})
    assert actions == [] and "zero-padded" in skipped[0] and _params(net) == before
    torch.testing.assert_close(net(x), want)


def test_conv_flatten_linear_channel_removal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    net.eval()
    with torch.no_grad():
        net[3].weight[:, 16:32] = 0  # channel 1 feeds nothing
        net[0].weight[4] = 0
        net[0].bias[4] = 0.3  # channel 4 is the constant relu(0.3): folded into the bias
    x = torch.randn(5, 1, 6, 6)
    want = net(x)
    actions, _ = remove_dead_units(net, {})
    assert net[0].out_channels == 4 and net[3].in_features == 4 * 16 and actions
    torch.testing.assert_close(net(x), want, atol=1e-6, rtol=0)


def test_export_with_cleanup_is_smaller_and_has_parity(tmp_path):
    net, masks = _dead_mlp(nn.Tanh)
    x = torch.randn(16, 10)
    r = export_onnx(net, tmp_path / "c.onnx", x, masks=masks, verify_inputs=x, latency=False)
    off = export_onnx(net, tmp_path / "d.onnx", x, masks=masks, cleanup=False, latency=False)
    c = r["cleanup"]
    assert c["params_after"] < c["params_before"] == off["cleanup"]["params_after"]
    assert any("removed" in a for a in c["actions"]) and off["cleanup"]["actions"] == []
    assert r["verification"]["max_abs_diff"] <= 1e-5
    assert r["bytes"]["file"] < off["bytes"]["file"]


def test_cnn_export_folds_batchnorm(tmp_path):
    net = make_cnn()
    masks = random_masks(net, 0.5)
    r = export_onnx(net, tmp_path / "b.onnx", torch.randn(4, 1, 6, 6), masks=masks,
                    latency=False)  # fmt: skip
    assert any("folded BatchNorm 1" in a for a in r["cleanup"]["actions"])
    assert r["verification"]["max_abs_diff"] <= 1e-5


def test_all_units_dead_leaves_model_unchanged():
    """Regression: a fully dead layer is kept, and no constant is folded into the next bias."""
    torch.manual_seed(0)
    net = make_mlp((6, 4, 3), act=nn.Tanh).eval()
    with torch.no_grad():
        net[0].weight.zero_()  # every unit outputs the constant tanh(b_j) != 0
    x = torch.randn(5, 6)
    want, bias = net(x), net[2].bias.clone()
    actions, skipped = remove_dead_units(net, {})
    assert actions == [] and "every unit of 0 is dead" in skipped[0]
    assert torch.equal(net[2].bias, bias)
    torch.testing.assert_close(net(x), want, atol=0, rtol=0)
