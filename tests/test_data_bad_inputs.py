"""Issue 13, data: every bad data input ends in one DataError line, raised at load/check time.

Library level (load_data, bundle_from_batches, check_bundle, check_data_fits) and CLI level
(``prunekit.cli.main`` in-process: exit 2, one ``error:`` line, no traceback, no run folder).
"""

from __future__ import annotations

import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.checkpoint import ARCH_KEY
from prunekit.data import DataBundle, bundle_from_batches, check_bundle, check_data_fits, load_data
from prunekit.errors import DataError, SettingError
from prunekit.prune.state import save_tensors
from prunekit.synthetic import SYNTHETIC_BOUNDS, SYNTHETIC_MAX_BYTES
from prunekit.types import ClassificationTask

ARCH = "prunekit.models:mlp?sizes=64,16,10&act=tanh"  # 10 outputs


def digits_like(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)


def npz(tmp_path, name: str = "d.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def with_arrays(tmp_path, **replace) -> str:
    """An .npz of digits-like x, y with some arrays replaced (False drops one)."""
    x, y = digits_like()
    arrays = {"x": x, "y": y, **replace}
    return npz(tmp_path, **{k: v for k, v in arrays.items() if v is not False})


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message, message
    return message


# ------------------------------------------------------------------ non-finite values


def test_nan_in_x_names_the_array_count_and_first_index(tmp_path):
    x, _ = digits_like()
    x[3, 5] = np.nan
    x[9, 0] = np.nan
    with pytest.raises(DataError) as info:
        load_data(with_arrays(tmp_path, x=x))
    msg = one_line(info)
    assert "x holds 2 non-finite values" in msg and "index (3, 5)" in msg


def test_inf_in_x_and_nan_in_float_targets(tmp_path):
    x, _ = digits_like()
    x[7, 1] = -np.inf
    with pytest.raises(DataError, match=r"x holds 1 non-finite value .*index \(7, 1\)"):
        load_data(with_arrays(tmp_path, x=x))
    y = np.linspace(0, 1, 60)
    y[4] = np.nan
    with pytest.raises(DataError, match=r": y holds 1 non-finite value .*index 4;"):
        load_data(with_arrays(tmp_path, y=y))


def test_float64_beyond_float32_counts_as_non_finite(tmp_path):
    x, _ = digits_like()
    x = x.astype(np.float64)
    x[2, 2] = 1e300  # finite in float64, inf once the data becomes float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=r"index \(2, 2\)"):
            load_data(with_arrays(tmp_path, x=x))
    assert not caught, [str(w.message) for w in caught]  # no numpy overflow warning


def test_non_finite_validation_and_named_inputs(tmp_path):
    x, y = digits_like()
    xv = x[:10].copy()
    xv[0, 3] = np.inf
    with pytest.raises(DataError, match=r"x_val holds 1 non-finite .*\(0, 3\)"):
        load_data(with_arrays(tmp_path, x_val=xv, y_val=y[:10]))
    feats = np.ones((20, 3), np.float32)
    feats[5, 1] = np.nan
    path = npz(tmp_path, "named.npz", ids=np.ones((20, 4), np.int64), feats=feats)
    with pytest.raises(DataError, match=r"feats holds 1 non-finite .*\(5, 1\)"):
        load_data(path)


def test_api_batches_with_nan_are_refused():
    x = torch.randn(10, 4)
    x[2, 1] = float("nan")
    with pytest.raises(DataError, match=r"x holds 1 non-finite value.*\(2, 1\)"):
        bundle_from_batches([(x, torch.zeros(10, dtype=torch.long))])


# ------------------------------------------------------------------ labels


def test_negative_labels_in_y_and_y_val(tmp_path):
    x, y = digits_like()
    y[4] = -1
    with pytest.raises(DataError) as info:
        load_data(with_arrays(tmp_path, y=y))
    assert "y holds 1 negative class label, the first -1 at index 4" in one_line(info)
    _, y = digits_like()
    yv = y[:10].copy()
    yv[[2, 3]] = -7
    with pytest.raises(DataError, match="y_val holds 2 negative class labels, the first -7 at"):
        load_data(with_arrays(tmp_path, x_val=x[:10], y_val=yv))


def test_labels_beyond_the_model_outputs_name_the_label_and_range(tmp_path):
    x, y = digits_like()
    y[4] = 12
    data = load_data(with_arrays(tmp_path, y=y))
    assert data.num_classes == 13
    model = nn.Linear(64, 10)
    with pytest.raises(DataError) as info:
        check_data_fits(model, data)
    msg = one_line(info)
    assert "13 classes" in msg and "(the largest 12)" in msg and "0..9" in msg


def test_label_far_out_of_range_is_refused_without_allocating(tmp_path):
    _, y = digits_like()
    y[0] = 2**40
    data = load_data(with_arrays(tmp_path, y=y))
    with pytest.raises(DataError, match=str(2**40)):
        check_data_fits(nn.Linear(64, 10), data)


def test_float_labels_with_a_fraction_name_it_and_print_no_warning(tmp_path, capfd):
    _, y = digits_like()
    y = y.astype(np.float64)
    y[2] = 0.5
    data = load_data(with_arrays(tmp_path, y=y))
    assert data.kind == "regression"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as info:
            check_data_fits(nn.Linear(64, 10), data, ClassificationTask())
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr() == ("", "")
    msg = one_line(info)
    assert "non-integer values such as 0.5" in msg and "classification task" in msg


def test_whole_number_float_labels_stay_regression_and_the_error_says_how_to_fix(tmp_path):
    """Documented choice: a float y is regression even with whole-number values; against a
    model with several outputs the line tells the user to save y as integers."""
    _, y = digits_like()
    data = load_data(with_arrays(tmp_path, y=y.astype(np.float32)))
    assert data.kind == "regression" and data.num_classes == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as info:
            check_data_fits(nn.Linear(64, 10), data)
    assert not caught
    msg = one_line(info)
    assert "10 outputs" in msg and "astype('int64')" in msg
    # a regression model with one output per example still fits the same data
    scalar = nn.Sequential(nn.Linear(64, 1), nn.Flatten(0))
    check_data_fits(scalar, data)


# ------------------------------------------------------------------ dtypes and shapes


@pytest.mark.parametrize(
    "replace, expected",
    [
        ({"y": np.array(["cat"] * 60)}, "y holds strings"),
        ({"x": np.array([["a"] * 64] * 60)}, "x holds strings"),
        ({"y": np.array([b"1"] * 60)}, "y holds bytes"),
        ({"x": np.ones((60, 64), np.complex64)}, "x holds complex numbers"),
    ],
)
def test_non_numeric_arrays_are_refused(tmp_path, replace, expected):
    with pytest.raises(DataError) as info:
        load_data(with_arrays(tmp_path, **replace))
    msg = one_line(info)
    assert expected in msg and "numeric" in msg


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    x, y = digits_like()
    np.savez(path, x=x, y=np.array([1, "a"] * 30, dtype=object))
    with pytest.raises(DataError) as info:  # .npz never unpickles: refused at read
        load_data(str(path))
    assert "obj.npz" in one_line(info)
    obj = np.empty(10, dtype=object)
    obj[:] = 1
    with pytest.raises(DataError, match="targets do not stack: .*object") as info:
        bundle_from_batches([(np.ones((10, 3), np.float32), obj)])
    one_line(info)


@pytest.mark.parametrize(
    "x, y, expected",
    [
        (np.ones((1, 64), np.float32), np.array([3]), "has 1 row;"),
        (np.ones((0, 64), np.float32), np.zeros(0, np.int64), "has 0 rows;"),
        (np.ones((2, 64), np.float32), np.array([1, 2]), "has 2 rows;"),
    ],
)
def test_too_few_rows_to_split_name_the_count(tmp_path, x, y, expected):
    with pytest.raises(DataError) as info:
        load_data(npz(tmp_path, x=x, y=y))
    msg = one_line(info)
    assert expected in msg and "at least 3" in msg
    assert load_data(npz(tmp_path, x=np.ones((3, 64)), y=np.array([0, 1, 2]))).n_train == 2


def test_given_splits_need_two_training_rows_and_one_validation_row(tmp_path):
    x, y = digits_like()
    with pytest.raises(DataError, match="training arrays have 1 row; training needs at least 2"):
        load_data(with_arrays(tmp_path, x=x[:1], y=y[:1], x_val=x[:5], y_val=y[:5]))
    with pytest.raises(DataError, match="validation arrays have 0 rows"):
        load_data(with_arrays(tmp_path, x_val=x[:0], y_val=y[:0]))


def test_x_val_shape_and_y_val_kind_must_match_training(tmp_path):
    x, y = digits_like()
    with pytest.raises(DataError) as info:
        load_data(with_arrays(tmp_path, x_val=np.zeros((20, 32), np.float32), y_val=y[:20]))
    msg = one_line(info)
    assert "x_val has examples of shape (32,) but x has (64,)" in msg
    with pytest.raises(DataError, match="y_val holds float32 targets .* y holds integer class"):
        load_data(with_arrays(tmp_path, x_val=x[:5], y_val=np.zeros(5, np.float32)))
    reg = np.zeros((60, 3), np.float32)
    with pytest.raises(DataError, match=r"y_val holds float32 targets of shape \(2,\)"):
        load_data(with_arrays(tmp_path, y=reg, x_val=x[:5], y_val=np.zeros((5, 2), np.float32)))


def test_validation_arrays_come_in_pairs(tmp_path):
    x, y = digits_like()
    with pytest.raises(DataError, match="has x_val but no y_val"):
        load_data(with_arrays(tmp_path, x_val=x[:5]))
    with pytest.raises(DataError, match="has y_val but no x_val"):
        load_data(with_arrays(tmp_path, y_val=y[:5]))


def test_scalar_array_and_unequal_lengths(tmp_path):
    with pytest.raises(DataError, match="x is a single value"):
        load_data(npz(tmp_path, x=np.float32(1.0), y=np.zeros(3, np.int64)))
    with pytest.raises(DataError, match="'x': 60, 'y': 59"):
        load_data(with_arrays(tmp_path, y=np.zeros(59, np.int64)))


def test_val_fraction_outside_zero_one_is_a_setting_error():
    for bad in (0, 1, -0.5, 1.5, float("nan")):
        with pytest.raises(SettingError, match="val_fraction"):
            load_data("digits", val_fraction=bad)


def test_api_batches_that_do_not_stack():
    batches = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)),
               (torch.randn(4, 5), torch.zeros(4, dtype=torch.long))]  # fmt: skip
    with pytest.raises(DataError, match="inputs do not stack") as info:
        bundle_from_batches(batches)
    one_line(info)


# ------------------------------------------------------------------ synthetic


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("synthetic?n=1000000000", "n='1000000000' must be a whole number in [3, 10,000,000]"),
        ("synthetic?dim=1000000000", "dim='1000000000' must be a whole number"),
        ("synthetic?classes=1000000000", "classes='1000000000' must be a whole number"),
        ("synthetic?n=-5", "n='-5'"),
        ("synthetic?n=1.5", "n='1.5'"),
        ("synthetic?n=10**9", "n='10**9'"),
        ("synthetic?n=abc", "n='abc'"),
        ("synthetic?dim=0", "dim='0'"),
        ("synthetic?seed=-1", "seed='-1'"),
        ("synthetic?bogus=1", "unknown option 'bogus' for task classification; valid: n, dim"),
        ("synthetic?task=tokens&dim=3", "unknown option 'dim' for task tokens"),
        ("synthetic?task=tokens&labels=maybe", "labels='maybe' must be yes or no"),
        ("synthetic?task=ranking", "task 'ranking' is not one of classification, regression"),
        ("synthetic?classes=1", "classes=1 must be >= 2 to classify"),
        ("synthetic?n=10000000&dim=1000", "would draw 74.8 GiB of arrays; the bound is 2 GiB"),
        ("synthetic?task=tokens&n=10000000&seq=100000", "GiB of arrays; the bound is 2 GiB"),
        ("digits?n=5", "options after '?' apply to synthetic only, not 'digits'"),
    ],
)
def test_synthetic_bounds_and_bad_options_fail_fast_in_one_line(spec, expected):
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_data(spec)
    assert time.perf_counter() - start < 1.0  # refused by the bound, not after allocating
    msg = one_line(info)
    assert expected in msg and spec in msg


def test_synthetic_bounds_are_documented_values():
    assert SYNTHETIC_BOUNDS["n"] == (3, 10_000_000)
    assert SYNTHETIC_MAX_BYTES == 2 * 2**30
    b = load_data("synthetic?task=regression&n=50&dim=5&classes=1")  # regression: 1 output ok
    assert b.kind == "regression" and tuple(b.y_train.shape[1:]) == (1,)


def test_synthetic_token_labels_are_the_most_frequent_token_class():
    """The vectorised label count gives what a per-class loop over the real tokens gives."""
    b = load_data("synthetic?task=tokens&n=50&seq=6&vocab=9&classes=3")
    for x, y in ((b.x_train, b.y_train), (b.x_val, b.y_val)):
        ids, mask = x["input_ids"].numpy(), x["attention_mask"].numpy()
        counts = np.stack([((ids % 3 == c) & (mask == 1)).sum(1) for c in range(3)], 1)
        assert np.array_equal(y.numpy(), counts.argmax(1))


# ------------------------------------------------------------------ module:function


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    """An importable module of misbehaving data functions."""
    (tmp_path / "pk_bad_data.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch
            from prunekit.data import DataBundle

            NOT_A_FUNCTION = 1

            def raises():
                raise ValueError("boom: no data today\\nsecond line of the essay")

            def none():
                return None

            def three():
                return (1, 2, 3)

            def pair_of_arrays():
                return np.zeros((50, 3), np.float32), np.zeros(50, np.int64)

            def ragged():
                return ([[1.0, 2.0], [3.0]], [0, 1]), ([[1.0, 2.0]], [0])

            def not_pairs():
                return [1, 2, 3], [4, 5]

            def strings():
                x = np.zeros((5, 2))
                return (x, np.array(["a"] * 5)), (x[:2], np.array(["a"] * 2))

            def objects():
                y = np.empty(5, dtype=object)
                y[:] = 1
                return (np.zeros((5, 2)), y), (np.zeros((2, 2)), y[:2])

            def wrong_width():
                x, y = np.zeros((50, 3), np.float32), np.zeros(50, np.int64)
                return (x, y), (x[:10], y[:10])

            def bad_bundle():
                y = torch.tensor([0, 1, 2, 0, 5])
                return DataBundle(torch.randn(5, 3), y, torch.randn(2, 3), torch.tensor([0, 1]),
                                  "classification", 3, "mine")
            """
        )
    )
    (tmp_path / "pk_bad_import.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pk_bad_data", "pk_bad_import"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "pk_bad_data"


@pytest.mark.parametrize(
    "func, expected",
    [
        ("raises", "data function 'pk_bad_data:raises' raised ValueError: boom: no data today"),
        ("none", "returned None; expected a DataBundle or (train, val)"),
        ("three", "returned a tuple of 3 items; expected"),
        ("pair_of_arrays", "returned two arrays (an array of shape (50, 3)"),
        ("ragged", "x is not an array"),
        ("not_pairs", "its train part (a list of 3 items) is not (x, y)"),
        ("strings", "y holds strings"),
        ("objects", "y holds Python objects (dtype object)"),
        ("NOT_A_FUNCTION", "'NOT_A_FUNCTION' is an int, not a function"),
        ("nothing_here", "does not import (module 'pk_bad_data' has no 'nothing_here')"),
        ("bad_bundle", "num_classes=3 but holds label 5"),
    ],
)
def test_data_functions_that_misbehave(data_module, func, expected):
    with pytest.raises(DataError) as info:
        load_data(f"{data_module}:{func}")
    msg = one_line(info)
    assert expected in msg, msg
    assert "second line" not in msg


def test_data_module_that_raises_at_import(data_module):
    with pytest.raises(DataError) as info:
        load_data("pk_bad_import:load")
    assert "does not import (RuntimeError: broken at import)" in one_line(info)


def test_data_function_of_the_wrong_width_fails_the_model_check(data_module):
    data = load_data(f"{data_module}:wrong_width")
    with pytest.raises(DataError, match=r"inputs of shape \(3,\) does not fit the model"):
        check_data_fits(nn.Linear(64, 10), data)


def test_check_bundle_refuses_a_bad_hand_made_bundle():
    good = DataBundle(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.randn(2, 3),
                      torch.tensor([0, 1]), "classification", 3, "mine")  # fmt: skip
    assert check_bundle(good) is good
    nan = DataBundle(torch.full((5, 3), float("nan")), None, torch.randn(2, 3), None,
                     "inputs", 0, "nan")  # fmt: skip
    with pytest.raises(DataError, match="x holds 15 non-finite values"):
        check_bundle(nan)
    odd = DataBundle(torch.randn(5, 3), None, torch.randn(2, 3), None, "pictures", 0, "odd")
    with pytest.raises(SettingError, match="unknown data kind 'pictures'"):
        check_bundle(odd)


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def model_file(tmp_path):
    """An untrained 64-16-10 MLP checkpoint (its metadata names the arch and digits)."""
    torch.manual_seed(0)
    from prunekit.checkpoint import build_model

    path = tmp_path / "dense.safetensors"
    save_tensors(path, build_model(ARCH).state_dict(), {ARCH_KEY: ARCH, "prunekit.data": "digits"})
    return path


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; assert exit 2 and one 'error:' line; return that line."""
    from prunekit.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    return lines[0]


def _spec(tmp_path, case: str) -> str:
    x, y = digits_like()
    if case == "nan":
        x[3, 5] = np.nan
        return with_arrays(tmp_path, x=x)
    if case == "label 12":
        y[4] = 12
        return with_arrays(tmp_path, y=y)
    if case == "label 0.5":
        return with_arrays(tmp_path, y=np.where(np.arange(60) == 2, 0.5, y))
    if case == "one row":
        return with_arrays(tmp_path, x=x[:1], y=y[:1])
    if case == "x_val shape":
        return with_arrays(tmp_path, x_val=np.zeros((20, 32), np.float32), y_val=y[:20])
    if case == "strings":
        return with_arrays(tmp_path, y=np.array(["cat"] * 60))
    return {"synthetic n": "synthetic?n=1000000000", "synthetic key": "synthetic?bogus=1"}[case]


CLI_CASES = {
    "nan": "index (3, 5)",
    "label 12": "(the largest 12); valid labels for 10 outputs are 0..9",
    "label 0.5": "non-integer values such as 0.5",
    "one row": "has 1 row",
    "x_val shape": "x_val has examples of shape (32,)",
    "strings": "y holds strings",
    "synthetic n": "must be a whole number in [3, 10,000,000]",
    "synthetic key": "unknown option 'bogus'",
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_prune_with_bad_data_exits_2_in_one_line_and_writes_nothing(
    case, tmp_path, model_file, capsys
):
    out = tmp_path / "run"
    line = cli_error(
        capsys, "prune", model_file, "--data", _spec(tmp_path, case), "--out", out,
        "--criterion", "magnitude", "--steps", "1", "--finetune-epochs", "0",
        "--final-epochs", "0", "--no-ntk", "--quiet",
    )  # fmt: skip
    assert CLI_CASES[case] in line, line
    assert not out.exists()


def test_export_with_nan_data_exits_2_before_exporting(tmp_path, model_file, capsys):
    x, _ = digits_like()
    x[3, 5] = np.nan
    onnx_path = tmp_path / "m.onnx"
    line = cli_error(capsys, "export", model_file, "--out", onnx_path, "--data",
                     with_arrays(tmp_path, x=x))  # fmt: skip
    assert "x holds 1 non-finite value" in line
    assert not onnx_path.exists() and not (tmp_path / "m.onnx.json").exists()


def test_a_text_file_named_npz_and_object_arrays_say_what_is_wrong(tmp_path):
    """No numpy hint about allow_pickle: prunekit never unpickles data."""
    import numpy as np

    from prunekit.data import load_data
    from prunekit.errors import DataError

    text = tmp_path / "data.npz"
    text.write_text("hello")
    with pytest.raises(DataError, match="is not an .npz archive") as info:
        load_data(str(text))
    assert "allow_pickle" not in str(info.value)
    objects = tmp_path / "obj.npz"
    np.savez(objects, x=np.array([{"a": 1}] * 5, dtype=object), y=np.arange(5))
    with pytest.raises(DataError, match="object arrays") as info:
        load_data(str(objects))
    assert "allow_pickle" not in str(info.value)


def test_positional_model_on_named_inputs_points_to_task():
    from torch import nn

    from prunekit.data import load_data
    from prunekit.datafit import check_data_fits
    from prunekit.errors import DataError

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 4)

        def forward(self, ids, mask):
            return self.embed(ids).mean(1)

    data = load_data("synthetic?task=tokens&n=50&classes=4")
    with pytest.raises(DataError, match="input_ids.*--task module:factory"):
        check_data_fits(Positional(), data)
