"""Every checkpoint form loads and gives identical outputs; every bad one is a CheckpointError."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from prunekit.checkpoint import ARCH_KEY, build_model, load_model, parse_arch
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.prune.state import save_tensors

ARCH = "prunekit.models:mlp?sizes=64,12,10&act=tanh"


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(loaded, reference, x):
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_prunekit_safetensors_with_arch_metadata(tmp_path, model, x):
    path = save_tensors(tmp_path / "m.safetensors", model.state_dict(), {ARCH_KEY: ARCH, "k": "v"})
    got = load_model(path)
    assert (got.fmt, got.arch) == ("safetensors", ARCH)
    assert got.metadata["k"] == "v"
    assert not got.model.training
    assert_same_outputs(got.model, model, x)


def test_safetensors_with_explicit_arch(tmp_path, model, x):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(path)
    got = load_model(path, arch=ARCH)
    assert (got.fmt, got.arch) == ("safetensors", ARCH)
    assert_same_outputs(got.model, model, x)


def test_explicit_arch_wins_over_metadata(tmp_path, model):
    path = save_tensors(tmp_path / "m.safetensors", model.state_dict(), {ARCH_KEY: "nope:nope"})
    assert load_model(path, arch=ARCH).arch == ARCH
    with pytest.raises(CheckpointError, match="nope"):
        load_model(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dict_pt_with_arch(tmp_path, model, x, suffix):
    path = tmp_path / f"sd{suffix}"
    torch.save(model.state_dict(), path)
    got = load_model(path, arch=ARCH)
    assert (got.fmt, got.arch) == ("state_dict", ARCH)
    assert_same_outputs(got.model, model, x)
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(path)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "weights"])
def test_wrapped_state_dict(tmp_path, model, x, key):
    path = tmp_path / "wrapped.pt"
    torch.save({key: model.state_dict(), "epoch": 7, "best_acc": 0.9}, path)
    got = load_model(path, arch=ARCH)
    assert got.fmt == "state_dict"
    assert_same_outputs(got.model, model, x)


def test_legacy_non_zip_state_dict(tmp_path, model, x):
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert_same_outputs(load_model(path, arch=ARCH).model, model, x)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive(tmp_path, model, x, how):
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    path = tmp_path / "ts.pt"
    scripted.save(str(path))
    got = load_model(path)
    assert (got.fmt, got.arch) == ("torchscript", None)
    assert not got.model.training
    assert_same_outputs(got.model, model, x)
    names = [n for n, _ in got.model.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]


def test_full_pickled_module_only_with_trust_pickle(tmp_path, model, x):
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-pickle") as info:
        load_model(path)
    assert str(path) in str(info.value)
    got = load_model(path, trust_pickle=True)
    assert got.fmt == "pickle"
    assert_same_outputs(got.model, model, x)
    assert not got.model.training


def test_pickled_non_tensor_objects_need_trust(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cfg": nn.ReLU()}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_model(path, arch=ARCH)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors.*does not exist"):
        load_model(tmp_path / "missing.safetensors", arch=ARCH)
    with pytest.raises(CheckpointError, match="not a file"):
        load_model(tmp_path, arch=ARCH)


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "make",
    [
        "random.pt",
        "random.safetensors",
        "empty.pt",
        "empty.safetensors",
        "truncated_zip.pt",
        "truncated_legacy.pt",
        "truncated.safetensors",
        "truncated_torchscript.pt",
        "text.pth",
    ],
)
def test_corrupt_files_raise_checkpoint_error(tmp_path, model, make):
    path = tmp_path / make
    if make.startswith("random"):
        path.write_bytes(os.urandom(4096))
    elif make.startswith("empty"):
        path.write_bytes(b"")
    elif make == "truncated_zip.pt":
        torch.save(model.state_dict(), path)
        _truncate(path)
    elif make == "truncated_legacy.pt":
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
        _truncate(path)
    elif make == "truncated.safetensors":
        save_tensors(path, model.state_dict(), {ARCH_KEY: ARCH})
        _truncate(path, 0.7)
    elif make == "truncated_torchscript.pt":
        torch.jit.script(model).save(str(path))
        _truncate(path, 0.8)
    else:
        path.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch=ARCH)
    assert str(path) in str(info.value)


def test_state_dict_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path, model):
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["3.bias"]
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch=ARCH)
    msg = str(info.value)
    assert "missing keys ['3.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert ARCH in msg


def test_state_dict_with_wrong_shapes_names_them(tmp_path, model):
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"1\.weight \(12, 64\) vs \(13, 64\)"):
        load_model(path, arch="prunekit.models:mlp?sizes=64,13,10&act=tanh")


def test_non_state_dict_contents_raise(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="neither a state_dict"):
        load_model(path, arch=ARCH)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:mlp", "does not import"),
        ("prunekit.models:no_such_factory", "does not import"),
        ("prunekit.models:mlp?sizes=0", "failed to build"),
        ("prunekit.models:mlp?colour=red", "failed to build"),
        ("builtins:dict", "not a Module"),
    ],
)
def test_arch_that_does_not_import_or_build(tmp_path, model, spec, match):
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path, arch=spec)
    assert spec in str(info.value)


@pytest.mark.parametrize(
    "spec",
    ["prunekit.models.mlp", ":mlp", "prunekit.models:", "", "prunekit.models:mlp?sizes"],
)
def test_bad_arch_syntax(spec):
    with pytest.raises(CheckpointError, match="module:factory|key=value"):
        parse_arch(spec)
    with pytest.raises(CheckpointError):
        build_model(spec)


def test_parse_arch_keyword_values():
    module, factory, kwargs = parse_arch(
        "pkg.mod:make?a=1&b=0.5&c=784,300,10&d=true&e=False&f=tanh&g=-3&h=1e-3&i=0.1,0.2&j=a,b"
    )
    assert (module, factory) == ("pkg.mod", "make")
    assert kwargs == {
        "a": 1,
        "b": 0.5,
        "c": [784, 300, 10],
        "d": True,
        "e": False,
        "f": "tanh",
        "g": -3,
        "h": 1e-3,
        "i": [0.1, 0.2],
        "j": ["a", "b"],
    }
    assert type(kwargs["a"]) is int and type(kwargs["b"]) is float
    assert parse_arch("m:f") == ("m", "f", {})
    assert parse_arch("m:f?") == ("m", "f", {})


def test_checkpoint_error_is_a_prunekit_error_with_exit_code_2():
    assert issubclass(CheckpointError, PrunekitError) and CheckpointError.exit_code == 2
