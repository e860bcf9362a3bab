"""The Python API re-exported from `prunekit` (design.md section 6), against float64 oracles."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import prunekit
from prunekit.checkpoint import load_model
from prunekit.data import DataBundle, load_data
from prunekit.errors import SettingError

FAST = {
    "steps": 2,
    "finetune_epochs": 0.1,
    "final_epochs": 0.1,
    "score_examples": 150,
    "ntk": False,
}
TARGETS = ("1.weight", "3.weight")  # the digits MLP: Flatten, Linear, Tanh, Linear


@pytest.fixture
def model(digits_model_file):
    """A fresh copy of the trained 64-32-10 digits MLP."""
    return load_model(digits_model_file).model


def _zeros(model: nn.Module, names) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[n] == 0).sum()) for n in names)


def _small_bundle(n_train: int = 40, n_val: int = 12, seed: int = 0) -> DataBundle:
    """A DataBundle built by hand (so the caller knows which training examples come first)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n_train + n_val,), generator=gen)
    return DataBundle(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "classification", 10, "h")


# ------------------------------------------------------------------ prune


def test_api_is_reexported():
    for name in ("prune", "score", "fisher_diagonal", "ntk_alignment", "export_onnx"):
        assert callable(getattr(prunekit, name)), name
        assert name in prunekit.__all__


def test_prune_spec_string_exact_sparsity_and_report_keys(model):
    n = sum(p.numel() for name, p in model.named_parameters() if name in TARGETS)
    result = prunekit.prune(model, "digits", criterion="obd", fisher="diag", sparsity=0.75, **FAST)
    assert isinstance(result, prunekit.PruneResult)
    assert result.model is model  # pruned in place
    want = round(0.75 * n)
    assert _zeros(model, TARGETS) == want
    assert sum(int((~m).sum()) for m in result.masks.values()) == want
    assert set(result.masks) == set(TARGETS)
    r = result.report
    for key in ("criterion", "fisher", "target_sparsity", "sparsity", "params", "metrics"):
        assert key in r, key
    assert r["criterion"] == "obd" and r["fisher"] == "diag" and r["target_sparsity"] == 0.75
    assert r["sparsity"]["global"] == pytest.approx(want / n, abs=1e-12)
    assert set(r["sparsity"]["per_layer"]) == set(TARGETS)
    assert r["params"]["prunable"] == n and r["params"]["zeros"] == want
    assert r["params"]["total"] == sum(p.numel() for p in model.parameters())
    for phase in ("dense", "pruned", "finetuned"):
        assert math.isfinite(r["metrics"][phase]["loss"])
        assert 0.0 <= r["metrics"][phase]["accuracy"] <= 1.0
    assert len(r["steps"]) == 2
    for k, row in enumerate(r["steps"], start=1):
        assert row["step"] == k
        for key in ("sparsity", "loss_after_prune", "loss_after_finetune", "accuracy", "seconds"):
            assert key in row, key
        assert "ntk_alignment" in row
    assert r["seconds"] > 0


def test_prune_accepts_an_iterable_of_batches(model):
    data = load_data("digits", seed=0)
    batches = [(data.x_train[i : i + 64], data.y_train[i : i + 64]) for i in range(0, 640, 64)]
    n = sum(p.numel() for name, p in model.named_parameters() if name in TARGETS)
    result = prunekit.prune(model, iter(batches), criterion="magnitude", sparsity=0.6, **FAST)
    assert _zeros(model, TARGETS) == round(0.6 * n)
    assert result.report["metrics"]["finetuned"]["accuracy"] > 0.5  # still a digits classifier


def test_prune_writes_a_run_directory_when_given_out(model, tmp_path):
    prunekit.prune(model, "digits", criterion="magnitude", sparsity=0.5, out=tmp_path / "r", **FAST)
    for name in ("model.safetensors", "masks.safetensors", "metrics.jsonl", "report.json"):
        assert (tmp_path / "r" / name).is_file(), name


def test_unknown_setting_names_the_valid_ones_and_changes_nothing(model):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SettingError) as info:
        prunekit.prune(model, "digits", sparsty=0.5)
    message = str(info.value)
    assert "sparsty" in message
    for valid in ("sparsity", "criterion", "steps", "finetune_epochs", "scope"):
        assert valid in message, valid
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_setting_value_is_a_setting_error(model):
    with pytest.raises(SettingError, match="bogus") as err:
        prunekit.prune(model, "digits", criterion="bogus")
    assert "auto" in str(err.value) and "obs" in str(err.value)


def test_magnitude_prune_keeps_the_largest_weights(model):
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prunekit.prune(
        model,
        "digits",
        criterion="magnitude",
        sparsity=0.5,
        steps=1,
        finetune_epochs=0,
        final_epochs=0,
        ntk=False,
    )
    kept = torch.cat([dense[n][m].abs().flatten() for n, m in result.masks.items()])
    dropped = torch.cat([dense[n][~m].abs().flatten() for n, m in result.masks.items()])
    assert kept.min() >= dropped.max()  # global scope: higher |theta| = keep


# ------------------------------------------------------------------ score


def test_score_magnitude_float32_shaped_ranks_like_abs_theta(model):
    before = copy.deepcopy(model.state_dict())
    scores = prunekit.score(model, "digits", criterion="magnitude", examples=100)
    params = dict(model.named_parameters())
    assert set(scores) == set(TARGETS)
    for name, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == params[name].shape
        theta = params[name].detach().abs().flatten()
        order = torch.argsort(theta)
        assert bool((s.flatten()[order].diff() >= 0).all())  # monotone in |theta|
        assert s.flatten()[order[-1]] > s.flatten()[order[0]]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no trace


def test_score_unknown_criterion_is_a_setting_error(model):
    with pytest.raises(SettingError, match="'nope'.*magnitude"):
        prunekit.score(model, "digits", criterion="nope", examples=50)


def test_score_unknown_criterion_setting_names_the_valid_ones(model):
    with pytest.raises(SettingError) as info:
        prunekit.score(model, "digits", criterion="obd", bogus=1, examples=50)
    assert "bogus" in str(info.value) and "fisher" in str(info.value)


def test_score_obd_equals_half_fisher_theta_squared(model):
    """higher = keep: OBD's saliency 0.5 F theta^2 with the same Fisher the API returns."""
    scores = prunekit.score(model, "digits", criterion="obd", fisher="diag", examples=120)
    fisher = prunekit.fisher_diagonal(model, "digits", estimator="diag", examples=120)
    params = dict(model.named_parameters())
    for name in TARGETS:
        theta = params[name].detach()
        assert (scores[name] >= 0).all()
        torch.testing.assert_close(scores[name], 0.5 * fisher[name] * theta**2, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ fisher_diagonal


def _per_example_sq_grad_oracle(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """mean_i (d CE(f(x_i), y_i) / d theta)^2 in float64 via torch.func."""
    net = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(net, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    return {k: (g**2).mean(0) for k, g in grads.items()}


def test_fisher_diagonal_empirical_equals_per_example_gradient_oracle(model):
    bundle = _small_bundle()
    n = 24  # the first 24 of the 40 training examples
    got = prunekit.fisher_diagonal(model, bundle, estimator="diag", labels="empirical", examples=n)
    want = _per_example_sq_grad_oracle(model, bundle.x_train[:n], bundle.y_train[:n])
    other = _per_example_sq_grad_oracle(model, bundle.x_train[n:], bundle.y_train[n:])
    assert set(got) == set(TARGETS)
    for name in TARGETS:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-9)
        assert not torch.allclose(got[name].double(), other[name], rtol=1e-2)  # really first n


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_fisher_diagonal_structured_estimators(model, estimator):
    bundle = _small_bundle()
    got = prunekit.fisher_diagonal(model, bundle, estimator=estimator, examples=30)
    params = dict(model.named_parameters())
    assert set(got) == set(TARGETS)
    for name, f in got.items():
        assert f.shape == params[name].shape and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all() and f.sum() > 0


def test_fisher_diagonal_unknown_estimator(model):
    with pytest.raises(SettingError, match="'bogus'"):
        prunekit.fisher_diagonal(model, _small_bundle(), estimator="bogus")


# ------------------------------------------------------------------ ntk_alignment, export_onnx


def test_ntk_alignment_keys_and_ranges(model):
    data = load_data("digits", seed=0)
    result = prunekit.ntk_alignment(model, data.x_val[:40], data.y_val[:40])
    for key in ("alignment", "per_layer", "effective_rank", "trace"):
        assert key in result, key
    assert 0.0 <= result["alignment"] <= 1.0
    assert set(result["per_layer"]) == set(TARGETS)
    assert all(0.0 <= v <= 1.0 for v in result["per_layer"].values())
    assert result["effective_rank"] >= 1.0 and result["trace"] > 0
    # a trained classifier's kernel is aligned with its labels more than with shuffled ones
    shuffled = data.y_val[:40][torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    assert (
        prunekit.ntk_alignment(model, data.x_val[:40], shuffled)["alignment"]
        < (result["alignment"])
    )


def test_export_onnx_writes_a_verified_file(model, tmp_path):
    with torch.no_grad():
        w = model.get_parameter("1.weight")
        w[w.abs() < w.abs().median()] = 0.0  # half the first layer pruned
    x = load_data("digits", seed=0).x_val[:32]
    path = tmp_path / "m.onnx"
    receipt = prunekit.export_onnx(model, path, x[:4], verify_inputs=x, latency=False)
    assert path.is_file() and receipt["bytes"]["file"] == path.stat().st_size
    assert receipt["storage"] == "packed" and receipt["verification"]["max_abs_diff"] <= 1e-5
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    assert float(np.abs(got - want).max()) <= 1e-5
