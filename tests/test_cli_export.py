"""`prunekit export` and `prunekit prune --export`: parity in onnxruntime, the receipt, and
every bad input of the export issue (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from prunekit.checkpoint import ARCH_KEY, load_model
from prunekit.data import load_data
from prunekit.prune.state import save_tensors

SPARSITY = 0.8
PRUNE_ARGS = [
    "--data", "digits", "--criterion", "magnitude", "--sparsity", str(SPARSITY), "--steps", "2",
    "--finetune-epochs", "0.1", "--final-epochs", "0.1", "--no-ntk", "--quiet",
]  # fmt: skip
HELPER_MODULE = "pk_export_unsupported_op"
HELPER_SOURCE = '''
import torch
from torch import nn


class EighNet(nn.Module):
    """Digits classifier whose forward uses linalg.eigvalsh (no ONNX exporter handles it)."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.fc(self.flat(x))
        return y + torch.linalg.eigvalsh(y.T @ y)[:1]


def factory():
    return EighNet()
'''


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy().astype(np.float32)})[0]


def torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


# ------------------------------------------------------------------ a pruned run, exported


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, digits_model_file, cli):
    """`prunekit prune ... --export RUN/model.onnx` on the trained digits MLP."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    code, stdout, stderr = cli(
        "prune", digits_model_file, *PRUNE_ARGS, "--out", out, "--export", out / "model.onnx"
    )
    return {"code": code, "out": out, "stdout": stdout, "stderr": stderr}


@pytest.fixture(scope="module")
def val_inputs():
    return load_data("digits", seed=0).x_val


def test_prune_export_writes_onnx_and_receipt_in_the_run_dir(pruned_run, val_inputs):
    assert pruned_run["code"] == 0, pruned_run["stderr"]
    assert "Traceback" not in pruned_run["stderr"]
    out = pruned_run["out"]
    for name in ("model.onnx", "model.onnx.json", "model.safetensors", "masks.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.rglob(".*.tmp")) and not (out / "export.json").exists()
    receipt = json.loads((out / "model.onnx.json").read_text())
    assert receipt["path"] == str(out / "model.onnx")  # its published place
    assert receipt["storage"] == "packed" and receipt["quantize"] is None
    assert receipt["bytes"]["file"] == (out / "model.onnx").stat().st_size
    assert receipt["bytes"]["ratio"] < 1.0  # 80% sparse, packed: smaller than dense fp32
    ver = receipt["verification"]
    assert ver["max_abs_diff"] <= 1e-5 and ver["weights"]["zeros"] >= ver["weights"]["pruned"] > 0
    assert "ONNX export" in pruned_run["stdout"]
    # the exported graph equals the pruned checkpoint the run wrote
    pruned = load_model(out / "model.safetensors").model
    got, want = onnx_outputs(out / "model.onnx", val_inputs), torch_outputs(pruned, val_inputs)
    assert got.shape == want.shape == (len(val_inputs), 10)
    assert float(np.abs(got - want).max()) <= 1e-5


def test_prune_export_graph_has_no_mask_multiplication(pruned_run):
    graph = onnx.load(str(pruned_run["out"] / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "Mul" not in ops  # masks are baked into the weights, never multiplied in
    assert {"CumSum", "ScatterElements"} <= ops  # the packed decoder


@pytest.mark.parametrize(
    ("storage", "quantize"),
    [("packed", None), ("dense", None), ("sparse", None), ("packed", "int8-weights")],
)
def test_export_command_every_mode(pruned_run, tmp_path, cli, val_inputs, storage, quantize):
    ckpt = pruned_run["out"] / "model.safetensors"
    before = ckpt.read_bytes()
    path = tmp_path / "m.onnx"
    args = ["export", ckpt, "--out", path, "--storage", storage]
    if quantize:
        args += ["--quantize", quantize]
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    receipt = json.loads((tmp_path / "m.onnx.json").read_text())
    assert receipt["storage"] == storage and receipt["quantize"] == quantize
    assert receipt["bytes"]["file"] == path.stat().st_size
    assert receipt["bytes"]["dense_fp32"] > 0 and "verification" in receipt
    assert "densely in memory" in receipt["memory_note"]
    pruned = load_model(ckpt).model
    got, want = onnx_outputs(path, val_inputs), torch_outputs(pruned, val_inputs)
    if quantize is None:
        assert receipt["verification"]["max_abs_diff"] <= 1e-5
        assert float(np.abs(got - want).max()) <= 1e-5
    else:  # int8: the accuracy change is reported, predictions mostly agree
        assert "accuracy_change" in receipt["verification"]
        assert float((got.argmax(1) == want.argmax(1)).mean()) > 0.9
    run_receipt = json.loads((pruned_run["out"] / "model.onnx.json").read_text())
    packed_fp32 = run_receipt["bytes"]["ratio"]
    if storage == "packed" and quantize:
        assert receipt["bytes"]["ratio"] < packed_fp32  # int8 values: smaller still
    elif storage == "packed":
        assert receipt["bytes"]["ratio"] == pytest.approx(packed_fp32, rel=0.01)
    elif storage == "dense":
        assert receipt["bytes"]["ratio"] > packed_fp32
    assert "storage" in stdout


# ------------------------------------------------------------------ bad input


def _state_dict_pt(tmp: Path, dense: Path) -> Path:
    path = tmp / "weights.pt"
    torch.save(load_model(dense).model.state_dict(), path)
    return path


def _unsupported_op_checkpoint(tmp: Path) -> Path:
    (tmp / f"{HELPER_MODULE}.py").write_text(HELPER_SOURCE)
    sys.modules.pop(HELPER_MODULE, None)
    sys.path.insert(0, str(tmp))
    import importlib

    torch.manual_seed(0)
    model = importlib.import_module(HELPER_MODULE).factory()
    path = tmp / "eigh.safetensors"
    meta = {ARCH_KEY: f"{HELPER_MODULE}:factory", "prunekit.data": "digits"}
    save_tensors(path, model.state_dict(), meta)
    return path


def _case(tmp: Path, model: Path, name: str):
    """(args, extra input files, substrings the one error line must contain)."""
    out = tmp / "out.onnx"
    if name == "checkpoint without an arch":
        sd = _state_dict_pt(tmp, model)
        return ["export", sd, "--out", out, "--data", "digits"], [sd], ["weights.pt", "--arch"]
    if name == "missing checkpoint":
        return ["export", tmp / "nope.safetensors", "--out", out], [], ["nope.safetensors", "exist"]
    if name == "output under a regular file":
        (tmp / "file.txt").write_text("keep me\n")
        path = tmp / "file.txt" / "sub" / "m.onnx"
        return ["export", model, "--out", path], [], ["file.txt", "is a file, not a folder"]
    if name == "missing output folder and a bad --dynamic-axis":
        path = tmp / "no_such_dir" / "m.onnx"
        args = ["export", model, "--out", path, "--dynamic-axis", "pixels:1"]
        return args, [], ["--dynamic-axis pixels:1", "no graph input is named 'pixels'"]
    if name == "existing receipt without --overwrite":
        (tmp / "out.onnx.json").write_text('{"keep": true}')
        return ["export", model, "--out", out], [], ["out.onnx.json", "--overwrite"]
    if name == "existing output file without --overwrite":
        out.write_bytes(b"keep me")
        return ["export", model, "--out", out], [out], ["out.onnx", "--overwrite"]
    if name == "out is the input checkpoint":
        return ["export", model, "--out", model, "--overwrite"], [], ["input checkpoint"]
    if name.startswith("int8 with "):
        storage = name.split()[-1]
        args = ["export", model, "--out", out, "--quantize", "int8", "--storage", storage]
        return args, [], ["'int8'", f"'{storage}'", "packed"]
    if name == "unknown storage":
        args = ["export", model, "--out", out, "--storage", "csr"]
        return args, [], ["'csr'", "dense, packed, sparse"]
    if name == "unknown quantize":
        return ["export", model, "--out", out, "--quantize", "fp4"], [], ["'fp4'", "int8"]
    if name == "opset too old for packed":
        return ["export", model, "--out", out, "--opset", "9"], [], ["opset 9", ">= 11"]
    if name == "no data anywhere":
        sd = _state_dict_pt(tmp, model)
        arch = "prunekit.models:mlp?sizes=64,32,10&act=tanh"
        return ["export", sd, "--arch", arch, "--out", out], [sd], ["--data"]
    if name == "unknown data spec":
        return ["export", model, "--out", out, "--data", "cifar10"], [], ["'cifar10'", "digits"]
    if name == "op the exporter cannot handle":
        ckpt = _unsupported_op_checkpoint(tmp)
        args = ["export", ckpt, "--out", out, "--arch", f"{HELPER_MODULE}:factory"]
        return args, [ckpt], ["linalg_eigvalsh", "EighNet"]
    raise AssertionError(name)


BAD_INPUTS = [
    "checkpoint without an arch",
    "missing checkpoint",
    "output under a regular file",
    "missing output folder and a bad --dynamic-axis",
    "existing receipt without --overwrite",
    "existing output file without --overwrite",
    "out is the input checkpoint",
    "int8 with dense",
    "int8 with sparse",
    "unknown storage",
    "unknown quantize",
    "opset too old for packed",
    "no data anywhere",
    "unknown data spec",
    "op the exporter cannot handle",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_export_bad_input_one_line_exit_2_nothing_written(
    name, tmp_path, digits_model_file, cli, monkeypatch
):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the helper module's path goes away
    model = tmp_path / "dense.safetensors"
    shutil.copy(digits_model_file, model)
    args, inputs, expected = _case(tmp_path, model, name)
    before = snapshot(tmp_path)
    assert before is not None
    inputs = [model, *inputs]
    before_inputs = {p: p.read_bytes() for p in inputs}

    code, stdout, stderr = cli(*args)

    assert code == 2, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in stderr + stdout
    assert stdout == ""
    for p, data in before_inputs.items():
        assert p.read_bytes() == data, f"input {p.name} changed"
    after = {k: v for k, v in snapshot(tmp_path).items() if "__pycache__" not in k}
    assert after == before  # nothing written, nothing changed, no temporary files


def test_verification_failure_exits_1_and_leaves_no_file(pruned_run, tmp_path, cli, monkeypatch):
    """A corrupted stored weight fails parity: exit 1 with the numbers, no file, no receipt."""
    from onnx import numpy_helper

    from prunekit.export import core

    real = core.apply_storage

    def corrupting(model, candidates, storage, quantize):
        rows = real(model, candidates, storage, quantize)
        for i, init in enumerate(model.graph.initializer):
            if init.name.endswith("__pk_values") or init.name == candidates[0].onnx_name:
                arr = numpy_helper.to_array(init).copy()
                arr[np.flatnonzero(arr)[0]] += 0.5
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
                break
        return rows

    monkeypatch.setattr(core, "apply_storage", corrupting)
    ckpt = pruned_run["out"] / "model.safetensors"
    code, stdout, stderr = cli("export", ckpt, "--out", tmp_path / "m.onnx")
    assert code == 1, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "max abs diff" in lines[0] and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no file, no receipt, no temporary file


def test_two_exports_into_one_folder_each_keep_their_receipt(pruned_run, tmp_path, cli):
    """The receipt is named after the model (a.onnx -> a.onnx.json): exports into one
    folder never collide, and --overwrite stays per file."""
    ckpt = pruned_run["out"] / "model.safetensors"
    for name, storage in (("a.onnx", "packed"), ("b.onnx", "dense")):
        code, _, stderr = cli("export", ckpt, "--out", tmp_path / name, "--storage", storage)
        assert code == 0, stderr
    assert files(tmp_path) == {"a.onnx", "a.onnx.json", "b.onnx", "b.onnx.json"}
    receipts = {n: json.loads((tmp_path / f"{n}.onnx.json").read_text()) for n in "ab"}
    assert [receipts[n]["storage"] for n in "ab"] == ["packed", "dense"]
    assert receipts["a"]["path"] == str(tmp_path / "a.onnx")
    before = (tmp_path / "b.onnx.json").read_bytes()
    code, _, stderr = cli("export", ckpt, "--out", tmp_path / "b.onnx")
    assert code == 2 and "b.onnx" in stderr and "--overwrite" in stderr
    assert (tmp_path / "b.onnx.json").read_bytes() == before
    code, _, stderr = cli("export", ckpt, "--out", tmp_path / "b.onnx", "--overwrite")
    assert code == 0, stderr
    assert json.loads((tmp_path / "b.onnx.json").read_text())["storage"] == "packed"
    assert json.loads((tmp_path / "a.onnx.json").read_text()) == receipts["a"]


def files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_export_into_missing_folders_creates_them(pruned_run, tmp_path, cli):
    ckpt = pruned_run["out"] / "model.safetensors"
    target = tmp_path / "new" / "deeper" / "m.onnx"
    code, _, stderr = cli("export", ckpt, "--out", target)
    assert code == 0, stderr
    assert files(tmp_path) == {"new", "new/deeper", "new/deeper/m.onnx", "new/deeper/m.onnx.json"}


def test_a_failed_export_removes_the_folders_it_made(pruned_run, tmp_path, cli, monkeypatch):
    from prunekit.errors import VerificationError
    from prunekit.export import core

    def failing(*args, **kwargs):
        raise VerificationError("export parity failed: max abs diff 0.5 > 1e-05 on 8 inputs")

    monkeypatch.setattr(core, "check_weights", failing)
    ckpt = pruned_run["out"] / "model.safetensors"
    (tmp_path / "kept").mkdir()
    code, _, stderr = cli("export", ckpt, "--out", tmp_path / "kept" / "new" / "m.onnx")
    assert code == 1 and "max abs diff" in stderr and stderr.count("\n") == 1, stderr
    assert files(tmp_path) == {"kept"}  # nothing left behind, the folder that was there kept


def test_export_data_that_does_not_fit_names_the_data(pruned_run, tmp_path, cli):
    ckpt = pruned_run["out"] / "model.safetensors"
    code, _, stderr = cli("export", ckpt, "--out", tmp_path / "m.onnx", "--data", "synthetic")
    assert code == 2
    assert "synthetic" in stderr and "fit" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ prune --export bad input


def test_prune_export_refused_before_pruning_leaves_no_folder(
    tmp_path, digits_model_file, cli, monkeypatch
):
    """The export's settings are tried by a dry export before any pruning: a bad one ends
    in one line, no pruning ran, no folder was made, no temporary file is left."""
    import tempfile

    import prunekit.loop

    def never(*args, **kwargs):
        raise AssertionError("pruning ran although the export settings were bad")

    monkeypatch.setattr(prunekit.loop, "run_pruning", never)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "run"
    for axis, needle in (("input:4", "has no axis 4"), ("input:3", "does not run at length 6")):
        code, stdout, stderr = cli(
            "prune", digits_model_file, *PRUNE_ARGS, "--out", out,
            "--export", tmp_path / "no_such_dir" / "m.onnx", "--dynamic-axis", axis,
        )  # fmt: skip
        assert code == 2, stderr
        assert stderr.count("\n") == 1 and f"--dynamic-axis {axis}" in stderr and needle in stderr
        assert files(tmp_path) == {"tmp"}  # no run, no export folder, no dry-export left


def test_prune_export_existing_file_needs_overwrite(tmp_path, digits_model_file, cli):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    code, _, stderr = cli(
        "prune", digits_model_file, *PRUNE_ARGS, "--out", tmp_path / "run", "--export", target
    )
    assert code == 2 and "--overwrite" in stderr, stderr
    assert target.read_bytes() == b"keep me"
    assert not (tmp_path / "run").exists()


def test_unsupported_op_leaks_no_warnings_or_colour_codes(
    tmp_path, cli, capfd, caplog, monkeypatch
):
    """What a real process would print besides the error line: log records and fd 2 output."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    ckpt = _unsupported_op_checkpoint(tmp_path)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        code, _, stderr = cli(
            "export", ckpt, "--out", tmp_path / "m.onnx", "--arch", f"{HELPER_MODULE}:factory"
        )
    assert code == 2 and "linalg_eigvalsh" in stderr
    leaked = capfd.readouterr().err
    records = [f"{r.name}: {r.getMessage()[:80]}" for r in caplog.records]
    assert records == [] and leaked == "", (records, leaked[-1000:])
    assert "\x1b[" not in stderr  # no terminal colour codes inside the message


# ------------------------------------------------------------------ example --out folders


@pytest.fixture
def quick_example(monkeypatch):
    """`prunekit example` without the training: a fresh MLP and fixed metrics."""
    import prunekit.api
    from prunekit.checkpoint import build_model
    from prunekit.models import EXAMPLES

    def trained(name, seed=0, progress=None):
        arch = EXAMPLES[name].arch
        return build_model(arch), arch, EXAMPLES[name].data, {"loss": 0.5, "accuracy": 0.9}

    monkeypatch.setattr(prunekit.api, "train_example", trained)


def test_example_out_makes_missing_folders_only_when_it_writes(
    tmp_path, cli, quick_example, monkeypatch
):
    from prunekit.errors import RunDirError
    from prunekit.prune import state

    target = tmp_path / "models" / "digits" / "m.safetensors"
    code, _, stderr = cli("example", "mlp-digits", "--out", target, "--quiet")
    assert code == 0, stderr
    assert files(tmp_path) == {"models", "models/digits", "models/digits/m.safetensors"}

    def full_disk(*args, **kwargs):
        raise RunDirError("cannot write: no space left on device")

    monkeypatch.setattr(state, "save_tensors", full_disk)
    code, _, stderr = cli("example", "mlp-digits", "--out", tmp_path / "x" / "y" / "m.safetensors")
    assert code == 2 and "no space left" in stderr
    assert not (tmp_path / "x").exists()  # the folders it made are gone again
    (tmp_path / "file.txt").write_text("keep me\n")
    code, _, stderr = cli("example", "mlp-digits", "--out", tmp_path / "file.txt" / "m.safetensors")
    assert code == 2 and stderr.count("\n") == 1 and "is a file, not a folder" in stderr
