"""Issue 13, export: opsets the exporters do not write are refused up front (exit 2, one
line with the valid range, never replaced by another opset), and nothing the exporters
print reaches the terminal: it goes to ``<out>.log``, and a fallback's reason is one
warning line."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from export_models import make_mlp
from torch import nn

import prunekit.export.exporters as exporters_mod
from prunekit.checkpoint import ARCH_KEY, build_model
from prunekit.errors import ModelError, RunDirError, SettingError
from prunekit.export import check_modes, export_onnx
from prunekit.export.exporters import OPSET_RANGES, SUPPORTED_OPSETS
from prunekit.prune.state import save_tensors

REAL_TS = exporters_mod._RUNNERS["torchscript"]
ARCH = "prunekit.models:mlp?sizes=64,16,10&act=tanh"


def never(*args):
    raise AssertionError("an exporter ran although the settings were refused up front")


def files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def no_exporters(monkeypatch):
    for name in ("torchscript", "dynamo"):
        monkeypatch.setitem(exporters_mod._RUNNERS, name, never)


# ------------------------------------------------------------------ opsets


def test_ranges_match_what_torch_declares():
    """The table was measured on torch 2.13; these are torch's own bounds behind it, so a
    torch upgrade that moves them fails here instead of exporting at an unchecked opset."""
    from torch.onnx import _constants
    from torch.onnx._internal.exporter import _constants as dynamo_constants

    assert OPSET_RANGES == {"torchscript": (7, 20), "dynamo": (15, 23)}
    assert SUPPORTED_OPSETS == (7, 23)
    assert OPSET_RANGES["torchscript"] == (
        _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    )  # fmt: skip
    assert OPSET_RANGES["dynamo"][1] == _constants.ONNX_MAX_OPSET
    assert dynamo_constants.TORCHLIB_OPSET == 18


@pytest.mark.parametrize(
    "opset, storage, expected",
    [
        (3, "packed", "opset 3 is too old for storage 'packed'; use opset >= 11 (valid: 11..23)"),
        (-1, "packed", "opset -1 is too old"),
        (6, "dense", "opset 6 is too old for storage 'dense'; use opset >= 7 (valid: 7..23)"),
        (24, "packed", "opset 24 is not one torch"),
        (99, "dense", "valid: 7..23 (torchscript 7..20, dynamo 15..23)"),
        (18.0, "dense", "opset 18.0 is not one"),
        ("18", "dense", "opset '18' is not one"),
        (True, "dense", "opset True is not one"),
    ],
)
def test_unsupported_opsets_are_refused_before_any_export(
    opset, storage, expected, tmp_path, no_exporters
):
    with pytest.raises(SettingError) as info:
        export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), storage=storage,
                    opset=opset, latency=False)  # fmt: skip
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert files(tmp_path) == set()


def test_check_modes_validates_the_opset_for_the_storage_mode():
    check_modes("packed", "int8", 13)
    check_modes("dense", None, 7)
    with pytest.raises(SettingError, match=r"opset 12 is too old for storage 'packed' with "
                                           r"quantize 'int8'; use opset >= 13 \(valid: 13..23\)"):
        check_modes("packed", "int8", 12)  # fmt: skip
    with pytest.raises(SettingError, match=r"for storage 'sparse'; valid: 11..23"):
        check_modes("sparse", None, 30)
    check_modes("packed", None)  # opset left out: only the names are checked


def test_opset_only_dynamo_writes_skips_torchscript_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", never)
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", REAL_TS)  # fast stand-in at 21
    with caplog.at_level(logging.WARNING, logger="prunekit.export"):
        r = export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), opset=21,
                        latency=False)  # fmt: skip
    assert r["exporter"] == "dynamo" and r["opset"] == 21
    assert r["exporter_fallback"] == "the torchscript exporter writes opsets 7..20, not 21"
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    fallback = [text for text in warned if text.startswith("exported with")]
    assert len(fallback) == 1 and "dynamo: the torchscript exporter writes" in fallback[0]


def test_an_exporter_that_writes_another_opset_counts_as_failed(tmp_path, monkeypatch):
    """dynamo keeps opset 18 when its version conversion fails: never passed on as asked."""
    monkeypatch.setitem(
        exporters_mod._RUNNERS, "dynamo", lambda net, x, opset, axes: REAL_TS(net, x, 18, axes)
    )
    r = export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), opset=17,
                    exporter="dynamo", latency=False)  # fmt: skip
    assert r["exporter"] == "torchscript" and r["opset"] == 17
    assert "it wrote opset 18, not the requested 17" in r["exporter_fallback"]
    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", never)
    with pytest.raises(ModelError, match="wrote opset 18, not the requested 17"):
        export_onnx(make_mlp().eval(), tmp_path / "n.onnx", torch.randn(2, 20), opset=17,
                    exporter="dynamo", latency=False)  # fmt: skip
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "n.onnx.log").exists()


def test_an_opset_only_torchscript_writes_never_falls_back_to_dynamo(tmp_path, monkeypatch):
    def broken(net, x, opset, axes):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' is not supported")

    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", broken)
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", never)  # would write 18, not 11
    with pytest.raises(ModelError) as info:
        export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), opset=11,
                    latency=False)  # fmt: skip
    message = str(info.value)
    assert "frobnicate" in message and "the dynamo exporter writes opsets 15..23, not 11" in message
    assert files(tmp_path) == set()


# ------------------------------------------------------------------ exporter output


def _noisy(tag: str, fail: bool):
    def run(net, x, opset, axes):
        print(f"{tag}-py-stdout")
        print(f"{tag}-py-stderr", file=sys.stderr)
        os.write(1, f"{tag}-fd1\n".encode())  # what C++ code does (the IR graph dump)
        os.write(2, f"{tag}-fd2\n".encode())
        warnings.warn(f"{tag}-warning", UserWarning, stacklevel=1)
        logging.getLogger("torch.onnx").warning("%s-log-record", tag)
        if fail:
            raise RuntimeError(f"{tag} broke\nsecond line of the essay")
        return REAL_TS(net, x, opset, axes)

    return run


def test_everything_exporters_print_goes_to_the_log(tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setitem(exporters_mod._RUNNERS, "torchscript", _noisy("ts", fail=True))
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", _noisy("dy", fail=False))
    with caplog.at_level(logging.WARNING):
        r = export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20),
                        latency=False)  # fmt: skip
    assert capfd.readouterr() == ("", "")  # not a byte on the terminal, fd 1/2 included
    log_path = tmp_path / "m.onnx.log"
    assert r["exporter"] == "dynamo" and r["exporter_log"] == str(log_path)
    text = log_path.read_text()
    for tag in ("ts", "dy"):
        for what in ("py-stdout", "py-stderr", "fd1", "fd2", "warning", "log-record"):
            assert f"{tag}-{what}" in text, (tag, what)
    assert "second line of the essay" in text  # the full failure is kept in the log
    assert r["exporter_fallback"] == "the torchscript exporter failed (RuntimeError: ts broke)"
    ours = [rec for rec in caplog.records if rec.name.startswith("prunekit")]
    ours = [rec for rec in ours if rec.getMessage().startswith("exported with")]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING
    assert f"exporter output in {log_path}" in ours[0].getMessage()
    assert not any("log-record" in rec.getMessage() for rec in caplog.records)


class CumMax(nn.Module):
    """No exporter of torch 2.13 handles cummax; the TorchScript one dumps its IR graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 4)

    def forward(self, x):
        return torch.cummax(self.fc(x), 1).values


def test_real_torchscript_failure_prints_nothing_and_writes_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", REAL_TS)  # fails the same way, fast
    with pytest.raises(ModelError) as info:
        export_onnx(CumMax().eval(), tmp_path / "c.onnx", torch.randn(2, 20), latency=False)
    assert "aten::cummax" in str(info.value) and "\n" not in str(info.value)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and (out, err) == ("", "")
    assert files(tmp_path) == set()


def test_silent_export_writes_no_log_and_removes_a_stale_one(tmp_path, capfd):
    r = export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), latency=False)
    assert r["exporter"] == "torchscript" and r["exporter_log"] is None
    assert r["exporter_fallback"] is None and files(tmp_path) == {"m.onnx"}
    (tmp_path / "m.onnx.log").write_text("from an earlier export\n")
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(RunDirError, match=r"m\.onnx\.log' already exists"):
        export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), latency=False,
                    overwrite=False)  # fmt: skip
    export_onnx(make_mlp().eval(), tmp_path / "m.onnx", torch.randn(2, 20), latency=False)
    assert files(tmp_path) == {"m.onnx"}  # a log that no longer describes m.onnx is gone
    assert capfd.readouterr() == ("", "")


class CellNet(nn.Module):
    """An nn.LSTMCell unrolled over the sequence (N, T, F)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def test_lstm_cell_exports_with_torchscript_quietly(tmp_path, capfd):
    torch.manual_seed(0)
    r = export_onnx(CellNet().eval(), tmp_path / "l.onnx", torch.randn(4, 5, 6), latency=False)
    assert r["exporter"] == "torchscript" and r["opset"] == 18
    assert r["verification"]["max_abs_diff"] <= 1e-5
    assert capfd.readouterr() == ("", "")


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dense.safetensors"
    save_tensors(path, build_model(ARCH).state_dict(), {ARCH_KEY: ARCH, "prunekit.data": "digits"})
    return path


def cli_error(capfd, *args) -> str:
    from prunekit.cli import main

    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "opset, expected",
    [("3", "opset 3 is too old"), ("-1", "opset -1"), ("24", "opset 24"), ("99", "opset 99")],
)
def test_cli_export_refuses_an_opset_before_exporting(
    opset, expected, tmp_path, checkpoint, capfd, no_exporters
):
    data = "synthetic?n=20&dim=64&classes=10"  # no sklearn import: the test stays fast
    line = cli_error(
        capfd, "export", checkpoint, "--out", tmp_path / "m.onnx", "--opset", opset, "--data", data
    )
    assert expected in line and "valid: 11..23" in line
    assert files(tmp_path) == {"dense.safetensors"}


def test_cli_export_of_a_model_no_exporter_handles_prints_one_line(
    tmp_path, checkpoint, capfd, monkeypatch
):
    (tmp_path / "pk_cummax_arch.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n\n    def forward(self, x):\n"
        "        return torch.cummax(self.fc(x.flatten(1)), 1).values\n\n"
        "def factory():\n    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pk_cummax_arch", raising=False)
    monkeypatch.setitem(exporters_mod._RUNNERS, "dynamo", REAL_TS)  # fails fast the same way
    arch = "pk_cummax_arch:factory"
    torch.manual_seed(0)
    ckpt = tmp_path / "cummax.safetensors"
    save_tensors(ckpt, build_model(arch).state_dict(), {"prunekit.data": "digits"})
    before = files(tmp_path)
    data = "synthetic?n=20&dim=64&classes=10"
    line = cli_error(
        capfd, "export", ckpt, "--arch", arch, "--out", tmp_path / "m.onnx", "--data", data
    )
    assert "no ONNX exporter could handle Net at opset 18" in line and "cummax" in line
    assert files(tmp_path) == before  # no onnx, no log, no receipt
