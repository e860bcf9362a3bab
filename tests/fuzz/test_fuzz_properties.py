"""Issue 13, property-based half: random recipe values, YAML text, --set overrides, .npz
arrays and checkpoint bytes, in-process at library level. Each must either be accepted or
raise ``PrunekitError`` (one line at the CLI); any other exception is a crash the user would
see as a traceback. Every example runs under a time and address-space bound, so a value
that makes the library loop or allocate without end fails the property instead of hanging
or exhausting the machine.

Deterministic (derandomize): the same examples every run, no example database written.
"""

from __future__ import annotations

import os
import resource
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from prunekit.errors import PrunekitError
from prunekit.recipe import SCHEMA, Field

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a hang would repeat per try
    suppress_health_check=list(HealthCheck),
)
ARCH = "prunekit.models:mlp?sizes=64,16,10&act=tanh"


class Overrun(BaseException):
    """The library call took too long (BaseException: no ``except Exception`` swallows it)."""


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def bounded(seconds: float = 8.0, memory: int = 3 << 30):
    """Raise Overrun after ``seconds``; allocations beyond ``memory`` more bytes fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + memory
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def alarm(_signum, _frame):
        raise Overrun(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def accepted_or_prunekit_error(call):
    """Run ``call()`` bounded; its result, or None when it raised a PrunekitError.

    Any other exception fails the property, naming the exception."""
    try:
        with bounded():
            return call()
    except PrunekitError:
        return None
    except Overrun as exc:
        pytest.fail(f"no answer: {exc}")
    except BaseException as exc:  # noqa: B036 - the property: nothing but PrunekitError
        pytest.fail(f"{type(exc).__name__} escaped instead of a PrunekitError: {exc!s:.300}")


@pytest.fixture(scope="module")
def workdir():
    """A folder with a small valid checkpoint, a junk file and room for recipe files."""
    from safetensors.torch import save_file

    from prunekit.checkpoint import build_model

    with tempfile.TemporaryDirectory(prefix="prunekit-fuzz-") as d:
        root = Path(d)
        state = {k: v.contiguous() for k, v in build_model(ARCH).state_dict().items()}
        save_file(state, str(root / "dense.safetensors"), {"prunekit.arch": ARCH})
        save_file(state, str(root / "weights.safetensors"))
        (root / "junk.safetensors").write_bytes(os.urandom(512))
        yield root


# ------------------------------------------------------------------ recipes

# Text never holds ':' so no random value names a module to import; specs with a colon come
# only from this list (prunekit's own, or modules that do not exist).
SAFE_SPECS = [
    "nosuchmodule_fuzz:x",
    "prunekit.models:nope",
    "prunekit.models:mlp?sizes=64,10",
    "prunekit.models:mlp?sizes=a,b",
    "prunekit.models:mlp?sizes=64,100000,10",
    "prunekit.models:mlp?bogus=1",
    ARCH,
    "prunekit.models:mlp?sizes=64,16,10&act=nope",
]
NAMES = [
    "obd", "qm", "lm", "magnitude", "obs", "ekfac", "kfac", "diag", "exact", "sampled",
    "empirical", "global", "layer", "exp", "linear", "cubic", "sgd", "adamw", "dense",
    "sparse", "packed", "int8", "auto", "classification", "regression", "distill", "kl", "mse",
    "cosine", "none", "x1.15", "x0", "x1", "10", "0", "-1", "mlp-digits", "cnn-digits", "nope",
    "digits", "synthetic", "synthetic?n=50&dim=64&classes=10", "synthetic?n=-1", "data.npz",
    "dense.safetensors", "weights.safetensors", "junk.safetensors", "r.yaml", ".", "..", "",
    "*", "1.weight", "[", "\x00", "é", "1e-3",
]  # fmt: skip
TEXT = st.text(alphabet=st.characters(blacklist_characters=":", codec="utf-8"), max_size=24)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2, max_value=2),
    TEXT,
    st.sampled_from(NAMES + SAFE_SPECS),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
KEYS = [
    (section, key)
    for section, spec in SCHEMA.items()
    for key in (spec if isinstance(spec, dict) else [None])
]


def base_tree(section: str, key: str | None) -> dict:
    """A valid, compute-free recipe (zoo example built on the meta device by validation)."""
    model = {"example": "mlp-digits"}
    if section == "model" and key in ("checkpoint", "arch"):
        model = {"checkpoint": "weights.safetensors", "arch": ARCH}
    return {
        "version": 1,
        "data": "digits",
        "model": model,
        "criterion": {"name": "magnitude"},
        "schedule": {"final": 0.5, "steps": 2},
    }


def check_recipe(path: Path, overrides=()):
    from prunekit.pipeline import load_checked_recipe, validate_recipe

    return validate_recipe(load_checked_recipe(path, overrides))


@pytest.mark.parametrize(
    ("section", "key"), KEYS, ids=[s if k is None else f"{s}.{k}" for s, k in KEYS]
)
@settings(SETTINGS, max_examples=12)
@given(value=VALUES)
@example(value=10**12)
@example(value=2**63)
@example(value=-1)
@example(value=float("nan"))
@example(value=float("-inf"))
@example(value=1e300)
@example(value="")
@example(value=None)
@example(value={"a": [1, {"b": None}]})
def test_any_value_of_a_recipe_key_validates_or_is_a_prunekit_error(workdir, section, key, value):
    tree = base_tree(section, key)
    if key is None:
        tree[section] = value
    else:
        tree.setdefault(section, {})
        tree[section][key] = value
    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    accepted_or_prunekit_error(lambda: check_recipe(path))


@SETTINGS
@given(section=st.sampled_from([s for s, f in SCHEMA.items() if isinstance(f, dict)]),
       value=VALUES)  # fmt: skip
def test_any_section_value_validates_or_is_a_prunekit_error(workdir, section, value):
    tree = base_tree(section, None)
    tree[section] = value
    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    accepted_or_prunekit_error(lambda: check_recipe(path))


OVERRIDE_KEYS = [k if s is None else f"{k}.{s}" for k, s in KEYS] + ["bogus", "schedule", "a.b.c"]
RAW = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters=":"), max_size=30),
    st.sampled_from(
        ["!!python/object/apply:os.getcwd []", ".nan", "-.inf", "1e400", "[1, [2, [3]]]",
         "{a: 1}", "&a [*a]", "*b", "9223372036854775808", "-1", "0x10", "0o7", "1_000",
         "'", '"', "{", "null", "~", "yes", "on", "2001-01-01", "!!binary aGVsbG8="]
        + NAMES
    ),
)  # fmt: skip


@SETTINGS
@given(key=st.sampled_from(OVERRIDE_KEYS), raw=RAW, sep=st.sampled_from(["=", "=", " = ", ""]))
def test_any_set_override_validates_or_is_a_prunekit_error(workdir, key, raw, sep):
    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(base_tree("model", None), sort_keys=False))
    accepted_or_prunekit_error(lambda: check_recipe(path, [f"{key}{sep}{raw}"]))


YAML_TOKENS = st.sampled_from(
    ["seed", "data", "model", "example", "checkpoint", "schedule", "steps", "final", ":", ": ",
     "\n", "\n  ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!python/name:os.sep",
     "!!map", "? ", "|", ">", "'", '"', "#", "---", "...", "%YAML 1.2\n", "\t", "\x00", "\ufeff",
     "mlp-digits", "1e3", ".nan", "-1", "9223372036854775808", "\xff"]
)  # fmt: skip


@SETTINGS
@given(parts=st.lists(YAML_TOKENS | TEXT, max_size=40))
def test_any_yaml_text_is_a_recipe_or_a_prunekit_error(workdir, parts):
    path = workdir / "r.yaml"
    path.write_text("".join(parts), encoding="utf-8")
    accepted_or_prunekit_error(lambda: check_recipe(path))


@SETTINGS
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"seed: 0\n", b"\xef\xbb\xbf"]))
def test_any_bytes_are_a_recipe_or_a_prunekit_error(workdir, data, prefix):
    path = workdir / "r.yaml"
    path.write_bytes(prefix + data)
    accepted_or_prunekit_error(lambda: check_recipe(path))


# ------------------------------------------------------------------ .npz data

DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.int8, np.bool_,
     np.complex64, np.dtype("U3"), np.dtype("S3"), np.dtype("M8[s]")]
)  # fmt: skip


@st.composite
def arrays(draw, rows: int | None = None, label: bool = False):
    """An array of any listed dtype; ``rows`` fixes the first dimension when given."""
    dtype = draw(DTYPES)
    if label and draw(st.booleans()):  # mostly plausible labels, some outside any range
        n = rows if rows is not None else draw(st.integers(0, 6))
        values = st.integers(-3, 12) | st.sampled_from([2**40, -(2**40)])
        return np.array(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.int64)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    if rows is not None:
        shape = (rows, *shape[1:])
    if np.dtype(dtype).kind == "f":
        width = np.dtype(dtype).itemsize * 8
        elements = st.floats(allow_nan=True, allow_infinity=True, width=width)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def npz_contents(draw) -> dict:
    n = draw(st.integers(0, 6))
    out = {}
    if draw(st.integers(0, 9)):  # usually an x
        out["x"] = draw(arrays(rows=n if draw(st.booleans()) else None))
    if draw(st.integers(0, 4)):
        out["y"] = draw(arrays(rows=n if draw(st.booleans()) else None, label=True))
    if draw(st.booleans()):
        m = draw(st.integers(0, 4))
        out["x_val"] = draw(arrays(rows=m))
        if draw(st.booleans()):
            out["y_val"] = draw(arrays(rows=m, label=True))
    if not draw(st.integers(0, 5)):
        out[draw(st.sampled_from(["input_ids", "extra", "x_val_val", "y"]))] = draw(arrays())
    if not draw(st.integers(0, 7)):  # an object array (pickled by savez): must stay unread
        obj = np.empty(2, dtype=object)
        obj[0], obj[1] = [1, 2], {"a": 3}
        out[draw(st.sampled_from(["x", "y", "x_val"]))] = obj
    return out


def load_npz(contents: dict):
    from prunekit.data import load_data

    with tempfile.TemporaryDirectory(prefix="prunekit-npz-") as d:
        path = Path(d) / "data.npz"
        np.savez(path, **contents)
        return accepted_or_prunekit_error(lambda: load_data(str(path)))


@SETTINGS
@given(contents=npz_contents())
def test_any_npz_loads_or_is_a_prunekit_error(contents):
    load_npz(contents)


def _tensors(x):
    return list(x.values()) if isinstance(x, dict) else [x]


@SETTINGS
@given(contents=npz_contents())
def test_an_npz_that_loads_is_clean(contents):
    """What the loader accepts is usable: finite inputs and targets, non-negative class labels,
    at least one training and one validation example, validation shaped like training."""
    bundle = load_npz(contents)
    if bundle is None:
        return
    assert bundle.n_train >= 1 and bundle.n_val >= 1, (bundle.n_train, bundle.n_val)
    for t in _tensors(bundle.x_train) + _tensors(bundle.x_val):
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), "non-finite inputs"
    for y in (bundle.y_train, bundle.y_val):
        if y is None or isinstance(y, dict):
            continue
        if y.is_floating_point():
            assert bool(torch.isfinite(y).all()), "non-finite targets"
        if bundle.kind == "classification":
            assert int(y.min()) >= 0, "negative class labels"
            assert int(y.max()) < bundle.num_classes
    train, val = bundle.x_train, bundle.x_val
    if not isinstance(train, dict):
        assert tuple(train.shape[1:]) == tuple(val.shape[1:]), (train.shape, val.shape)


@SETTINGS
@given(data=st.binary(max_size=400), zipped=st.booleans())
def test_any_bytes_as_npz_are_a_prunekit_error(data, zipped):
    from prunekit.data import load_data

    with tempfile.TemporaryDirectory(prefix="prunekit-npz-") as d:
        path = Path(d) / "data.npz"
        path.write_bytes((b"PK\x03\x04" if zipped else b"") + data)
        accepted_or_prunekit_error(lambda: load_data(str(path)))


@SETTINGS
@given(
    options=st.dictionaries(
        st.sampled_from(["n", "dim", "classes", "task", "seed", "seq", "vocab", "labels", "x"]),
        st.sampled_from(["-5", "0", "1", "2", "3", "abc", "1e3", "nan", "10000000000",
                         "tokens", "regression", "classification", "no", ""]),
        max_size=4,
    )
)  # fmt: skip
def test_any_synthetic_options_load_or_are_a_prunekit_error(options):
    from prunekit.data import load_data

    spec = "synthetic?" + "&".join(f"{k}={v}" for k, v in options.items())
    accepted_or_prunekit_error(lambda: load_data(spec))


# ------------------------------------------------------------------ checkpoints


@st.composite
def checkpoint_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "safetensors header", "zip", "pickle"]))
    tail = draw(st.binary(max_size=300))
    if kind == "safetensors header":
        entry = {
            "dtype": draw(st.sampled_from(["F32", "F64", "I64", "BOOL", "XX", ""])),
            "shape": draw(st.lists(st.integers(-2, 10**6), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-1, 10**9), max_size=3)),
        }
        meta = {"prunekit.arch": draw(st.sampled_from(SAFE_SPECS + [""]))}
        import json

        head = json.dumps({"w": entry, "__metadata__": meta}).encode()
        length = draw(st.sampled_from([len(head), len(head) + 7, 0, 2**63 - 1]))
        return length.to_bytes(8, "little") + head + tail
    if kind == "zip":
        return b"PK\x03\x04" + tail
    if kind == "pickle":
        return b"\x80\x02" + tail
    return tail


@SETTINGS
@given(data=checkpoint_bytes(), suffix=st.sampled_from([".safetensors", ".pt", ".pth", ".bin"]))
def test_any_checkpoint_bytes_are_a_prunekit_error(data, suffix):
    from prunekit.checkpoint import load_model

    with tempfile.TemporaryDirectory(prefix="prunekit-ckpt-") as d:
        path = Path(d) / f"model{suffix}"
        path.write_bytes(data)
        accepted_or_prunekit_error(lambda: load_model(path, arch=ARCH))


def test_properties_cover_every_schema_key():
    """The recipe property draws from every key of the schema (a new key is fuzzed too)."""
    keys = {f"{s}.{k}" if k else s for s, k in KEYS}
    for section, spec in SCHEMA.items():
        names = [f"{section}.{k}" for k in spec] if isinstance(spec, dict) else [section]
        assert set(names) <= keys
    fields = [f for s in SCHEMA.values() for f in (s.values() if isinstance(s, dict) else [s])]
    assert fields and all(isinstance(f, Field) for f in fields)
