"""Run state on disk: atomic writes, safetensors with metadata, run-dir checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from prunekit.errors import RunDirError
from prunekit.prune.state import (
    RUN_FILES,
    atomic_write,
    check_run_dir,
    save_masks,
    save_tensors,
    write_json,
    write_jsonl,
)


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def failing(tmp):
        tmp.write_text("half of the new cont")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_atomic_write_on_a_new_path_leaves_nothing_when_the_writer_raises(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"

    def failing(tmp):
        tmp.write_bytes(b"xx")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, failing)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    written = atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert written == path and path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_json_and_jsonl(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1, "b": [1.5, None]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "b": [1.5, None]}
    rows = [{"step": 0}, {"step": 1, "x": 0.5}]
    write_jsonl(tmp_path / "m.jsonl", rows)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_save_tensors_round_trip_with_metadata_and_shared_storage(tmp_path):
    w = torch.randn(3, 4)
    tensors = {"a": w, "tied": w, "view": w.t(), "b": torch.arange(5)}
    path = save_tensors(tmp_path / "t.safetensors", tensors, {"prunekit.arch": "m:f", "step": 3})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"prunekit.arch": "m:f", "step": "3"}
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_save_masks_stores_uint8_and_kind(tmp_path):
    masks = {"w": torch.tensor([[True, False], [False, True]])}
    path = save_masks(tmp_path / "m.safetensors", masks, {"prunekit.step": "2"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["prunekit.kind"] == "masks"
        assert f.metadata()["prunekit.step"] == "2"
        got = f.get_tensor("w")
    assert got.dtype == torch.uint8 and torch.equal(got.bool(), masks["w"])


def test_check_run_dir_accepts_a_new_or_empty_directory_without_creating_it(tmp_path):
    out = tmp_path / "run"
    assert check_run_dir(out, overwrite=False) == out
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("unrelated")
    assert check_run_dir(out, overwrite=False) == out


@pytest.mark.parametrize("earlier", RUN_FILES)
def test_check_run_dir_refuses_an_earlier_run_without_overwrite(tmp_path, earlier):
    (tmp_path / earlier).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / earlier).write_text("{}")
    with pytest.raises(RunDirError, match="--overwrite") as info:
        check_run_dir(tmp_path, overwrite=False)
    assert earlier in str(info.value)
    assert check_run_dir(tmp_path, overwrite=True) == tmp_path
    assert (tmp_path / earlier).read_text() == "{}"  # checking never deletes


def test_check_run_dir_refuses_to_replace_the_input_even_with_overwrite(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="input"):
            check_run_dir(tmp_path, overwrite=overwrite, inputs=(model,))
    # also through a relative / non-normalised spelling of the same directory
    with pytest.raises(RunDirError, match="input"):
        check_run_dir(tmp_path / "x" / "..", overwrite=True, inputs=(model,))
    # and for extra files (e.g. an export next to the run)
    onnx = tmp_path / "model.onnx"
    with pytest.raises(RunDirError, match="input"):
        check_run_dir(tmp_path, True, inputs=(onnx,), extra_files=("model.onnx",))
    assert model.read_bytes() == b"weights"


def test_check_run_dir_allows_an_input_elsewhere(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    assert check_run_dir(tmp_path / "run", overwrite=False, inputs=(model,))


def test_check_run_dir_refuses_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("a file")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(path, overwrite=True)
