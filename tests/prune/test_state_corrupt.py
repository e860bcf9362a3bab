"""Resume state is untrusted input: every corrupt, truncated, missing or foreign state/ is a
RunDirError naming the bad file, and reading it never writes or deletes anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunekit.errors import PrunekitError, RunDirError
from prunekit.prune.state import (
    check_state_keys,
    check_step_state,
    load_step_state,
    save_masks,
    save_step_state,
)

TENSORS = {"model/w": torch.arange(6.0).reshape(2, 3), "mask/w": torch.ones(2, 3)}
INFO = {"rows": [{"step": 0}], "cache": {"ekfac_step": None}, "recipe_hash": "abc"}


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with a valid checkpoint at step 2."""
    out = tmp_path / "run"
    save_step_state(out, 1, TENSORS, INFO)
    save_step_state(out, 2, TENSORS, INFO)
    return out


def latest(run: Path) -> Path:
    return run / "state" / "latest.json"


def step_file(run: Path) -> Path:
    return run / "state" / "step-00002.safetensors"


def edit_latest(run: Path, **changes) -> None:
    info = json.loads(latest(run).read_text())
    for key, value in changes.items():
        if value is KeyError:
            del info[key]
        else:
            info[key] = value
    latest(run).write_text(json.dumps(info))


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: file bytes, link targets, folders (no following)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "dir" if path.is_dir() else "other"
    return found


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed safetensors header of ``path`` and write it back."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def set_step_meta(header: dict) -> dict:
    header["__metadata__"]["prunekit.step"] = "7"
    return header


def break_offsets(header: dict) -> dict:
    header["model/w"]["data_offsets"] = [20, 10]
    return header


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def escape_by_symlink(run: Path) -> None:
    """A valid state file outside the run, reached through a symlink inside state/."""
    outside = run.parent / "elsewhere"
    save_step_state(outside, 2, TENSORS, INFO)
    step_file(run).unlink()
    step_file(run).symlink_to(outside / "state" / "step-00002.safetensors")


def link_state_dir(run: Path) -> None:
    real = run.parent / "real-state"
    (run / "state").rename(real)
    (run / "state").symlink_to(real)


# (id, how to break the run folder, the file the message must name, words it must contain)
CASES = [
    ("latest-not-utf8", lambda r: latest(r).write_bytes(b'{"step": "\xff\xfe"}'), latest,
     "not UTF-8"),
    ("latest-bad-json", lambda r: latest(r).write_text('{"step": 2,'), latest,
     "not valid JSON"),
    ("latest-truncated", lambda r: latest(r).write_bytes(latest(r).read_bytes()[:17]), latest,
     "not valid JSON"),
    ("latest-empty", lambda r: latest(r).write_bytes(b""), latest, "not valid JSON"),
    ("latest-array", lambda r: latest(r).write_text("[1, 2]"), latest,
     "JSON array, expected an object"),
    ("latest-string", lambda r: latest(r).write_text('"step-00002.safetensors"'), latest,
     "JSON string, expected an object"),
    ("latest-deep", lambda r: latest(r).write_text("[" * 100_000 + "]" * 100_000), latest,
     "not valid JSON"),
    ("latest-a-folder", lambda r: (latest(r).unlink(), latest(r).mkdir()), latest,
     "not a regular file"),
    ("latest-a-fifo", lambda r: fifo(latest(r)), latest, "not a regular file"),
    ("step-missing", lambda r: edit_latest(r, step=KeyError), latest, "lacks the keys ['step']"),
    ("tensors-missing", lambda r: edit_latest(r, tensors=KeyError), latest,
     "lacks the keys ['tensors']"),
    ("step-a-string", lambda r: edit_latest(r, step="2"), latest,
     "'step' of type string, expected integer"),
    ("step-a-float", lambda r: edit_latest(r, step=2.5), latest,
     "'step' of type number, expected integer"),
    ("step-a-bool", lambda r: edit_latest(r, step=True), latest,
     "'step' of type boolean, expected integer"),
    ("step-null", lambda r: edit_latest(r, step=None), latest, "'step' of type null"),
    ("step-negative", lambda r: edit_latest(r, step=-1), latest,
     "step -1, expected an integer >= 0"),
    ("tensors-a-list", lambda r: edit_latest(r, tensors=["step-00002.safetensors"]), latest,
     "'tensors' of type array, expected string"),
    ("tensors-absolute", lambda r: edit_latest(r, tensors=str(step_file(r).resolve())), latest,
     "absolute path"),
    ("tensors-dotdot", lambda r: edit_latest(r, tensors="../state/step-00002.safetensors"),
     latest, "no separator or '..'"),
    ("tensors-only-dotdot", lambda r: edit_latest(r, tensors=".."), latest, "'..'"),
    ("tensors-separator", lambda r: edit_latest(r, tensors="sub/step-00002.safetensors"), latest,
     "no separator"),
    ("tensors-backslash", lambda r: edit_latest(r, tensors="a\\step-00002.safetensors"), latest,
     "no separator"),
    ("tensors-nul", lambda r: edit_latest(r, tensors="step-00002.safetensors\0"), latest,
     "plain file name"),
    ("tensors-other-name", lambda r: edit_latest(r, tensors="model.safetensors"), latest,
     "like 'step-00003.safetensors'"),
    ("tensors-symlink-escape", escape_by_symlink, latest, "outside"),
    ("state-dir-symlink", link_state_dir, lambda r: r / "state", "symbolic link"),
    ("state-a-file", lambda r: (shutil.rmtree(r / "state"), (r / "state").write_text("x")),
     lambda r: r / "state", "is not a folder"),
    ("step-file-missing", lambda r: step_file(r).unlink(), step_file, "is missing"),
    ("step-file-a-folder", lambda r: (step_file(r).unlink(), step_file(r).mkdir()), step_file,
     "not a regular file"),
    ("step-file-empty", lambda r: step_file(r).write_bytes(b""), step_file,
     "truncated (0 bytes"),
    ("step-file-4-bytes", lambda r: step_file(r).write_bytes(b"\x10\x00\x00\x00"), step_file,
     "truncated (4 bytes"),
    ("step-file-cut-in-header", lambda r: step_file(r).write_bytes(step_file(r).read_bytes()[:40]),
     step_file, "header of"),
    ("step-file-cut-in-data", lambda r: step_file(r).write_bytes(step_file(r).read_bytes()[:-5]),
     step_file, "is truncated (tensor"),
    ("step-file-huge-header-length",
     lambda r: step_file(r).write_bytes(b"\xff" * 8 + step_file(r).read_bytes()[8:]), step_file,
     "truncated or corrupt"),
    ("step-file-garbage-header",
     lambda r: step_file(r).write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe{[" + b"0" * 8),
     step_file, "corrupt safetensors header"),
    ("step-file-header-a-list",
     lambda r: step_file(r).write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"), step_file,
     "not a JSON object"),
    ("step-file-bad-offsets", lambda r: rewrite_header(step_file(r), break_offsets), step_file,
     "corrupt safetensors entry for tensor 'model/w'"),
    ("step-file-trailing-bytes",
     lambda r: step_file(r).write_bytes(step_file(r).read_bytes() + b"junk"), step_file,
     "cannot be loaded"),
    ("step-file-no-metadata", lambda r: save_file(TENSORS, str(step_file(r))), step_file,
     "prunekit.kind is None, expected 'state'"),
    ("step-file-is-masks",
     lambda r: save_masks(step_file(r), {"w": torch.ones(2, 2, dtype=torch.bool)}, {}),
     step_file, "prunekit.kind is 'masks'"),
    ("step-file-other-step", lambda r: rewrite_header(step_file(r), set_step_meta), step_file,
     "holds step '7' but latest.json names step 2"),
    ("latest-names-older-step", lambda r: edit_latest(r, step=1), step_file,
     "holds step '2' but latest.json names step 1"),
]  # fmt: skip


@pytest.mark.parametrize(("breaker", "bad_file", "words"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_corrupt_state_is_refused_naming_the_file_and_left_as_it_was(
    run, breaker, bad_file, words
):
    breaker(run)
    before = snapshot(run.parent)
    for reader in (load_step_state, check_step_state):
        if words == "cannot be loaded" and reader is check_step_state:
            continue  # only safetensors' full load sees a data section longer than declared
        with pytest.raises(RunDirError) as info:
            reader(run)
        message = str(info.value)
        assert words in message, message
        assert repr(str(bad_file(run))) in message, message
        assert "\n" not in message and "--overwrite" in message
        assert isinstance(info.value, PrunekitError) and info.value.exit_code == 2
    assert snapshot(run.parent) == before  # refusing writes and deletes nothing


def test_there_are_many_distinct_corruption_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def test_a_valid_state_loads_and_validates(run):
    tensors, info = load_step_state(run)
    assert info["step"] == 2 and info["tensors"] == "step-00002.safetensors"
    assert info["rows"] == INFO["rows"]
    assert set(tensors) == set(TENSORS) and torch.equal(tensors["model/w"], TENSORS["model/w"])
    assert check_step_state(run) == info


def test_no_checkpoint_is_none_not_an_error(tmp_path):
    assert load_step_state(tmp_path / "absent") is None
    assert check_step_state(tmp_path) is None
    # a crash before the first latest.json leaves a step file only: still no checkpoint
    (tmp_path / "state").mkdir()
    save_file(TENSORS, str(tmp_path / "state" / "step-00001.safetensors"))
    assert load_step_state(tmp_path) is None


def test_a_dangling_latest_symlink_is_refused(run):
    latest(run).unlink()
    latest(run).symlink_to(run / "nowhere.json")
    with pytest.raises(RunDirError, match="latest.json' is missing"):
        check_step_state(run)


SCHEMA = {"rows": list, "cache": dict, "recipe_hash": (str, type(None))}


def test_schema_accepts_what_the_run_wrote(run):
    info = check_step_state(run, required=SCHEMA)
    assert info["recipe_hash"] == "abc"
    optional = {"cache": dict, "recipe_hash": str, "x": int}
    assert load_step_state(run, required={"rows": list}, optional=optional)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rows": KeyError}, "lacks the keys ['rows']"),
        ({"rows": {"0": 1}}, "'rows' of type object, expected array"),
        ({"cache": []}, "'cache' of type array, expected object"),
        ({"recipe_hash": 3}, "'recipe_hash' of type integer, expected string or null"),
        ({"foreign": 1}, "unexpected keys ['foreign']"),
    ],
)
def test_schema_refuses_missing_wrong_and_unknown_keys(run, change, words):
    edit_latest(run, **change)
    before = snapshot(run)
    with pytest.raises(RunDirError, match="latest.json") as info:
        load_step_state(run, required=SCHEMA)
    assert words in str(info.value)
    assert snapshot(run) == before


def test_without_a_schema_extra_keys_are_allowed(run):
    edit_latest(run, foreign=1)
    assert check_step_state(run)["foreign"] == 1


def test_optional_keys_are_type_checked_when_present(run):
    edit_latest(run, ntk="no")
    with pytest.raises(RunDirError, match="'ntk' of type string, expected array"):
        check_step_state(run, required=SCHEMA, optional={"ntk": list})


EXPECTED = {"model/w": (2, 3), "mask/w": (2, 3)}


def test_check_state_keys_accepts_the_expected_tensors(run):
    tensors, _ = load_step_state(run, expected=EXPECTED)
    check_state_keys(tensors, list(EXPECTED))
    check_state_keys({**tensors, "cache/a/b": torch.ones(1)}, EXPECTED, ("cache/",))
    check_state_keys(tensors, {"model/w": None, "mask/w": (2, 3)})  # None: any shape


@pytest.mark.parametrize(
    ("expected", "prefixes", "words"),
    [
        ({**EXPECTED, "rng/torch": None}, (), "missing tensors ['rng/torch']"),
        ({"model/w": (2, 3)}, (), "unexpected tensors ['mask/w']"),
        ({"model/w": (2, 3)}, ("cache/",), "unexpected tensors ['mask/w']"),
        ({"model/w": (3, 2), "mask/w": (2, 3)}, (), "'model/w' of shape [2, 3], expected [3, 2]"),
    ],
)
def test_check_state_keys_refuses_a_state_of_another_run(run, expected, prefixes, words):
    before = snapshot(run)
    with pytest.raises(RunDirError) as info:
        load_step_state(run, expected=expected, optional_prefixes=prefixes)
    assert words in str(info.value) and "step-00002.safetensors" in str(info.value)
    assert snapshot(run) == before
    tensors = {"model/w": torch.ones(2, 3), "mask/w": torch.ones(2, 3)}
    with pytest.raises(RunDirError, match="does not fit|of shape"):
        check_state_keys(tensors, expected, prefixes)


def test_a_huge_file_value_is_quoted_short(run):
    edit_latest(run, tensors="x" * 10_000)
    with pytest.raises(RunDirError) as info:
        check_step_state(run)
    assert len(str(info.value)) < 400 and "..." in str(info.value)
