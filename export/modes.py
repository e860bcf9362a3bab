"""Export modes and opsets: the names the CLI and recipes validate against.

Kept apart from the exporters so that `prunekit --help` and `prunekit validate` check a
storage mode or an opset without importing onnx or onnxruntime.
"""

from __future__ import annotations

import numbers
from importlib.metadata import version

from prunekit.errors import SettingError, choice_error

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18  # TorchScript and dynamo exporters both support it; >= 13 for int8

#: exporter -> (lowest, highest) opset it writes as asked in torch 2.13, measured by exporting
#: an MLP, a CNN with BatchNorm, an nn.LSTM and an nn.LSTMCell loop at opsets 5..29 and
#: checking the written opset and onnxruntime parity. TorchScript (dynamo=False): 7..20,
#: torch's own floor and ceiling (21..23 export under torch's "not supported" warning, 24 and
#: up raise). dynamo: torchlib implements 18 and the ONNX version converter reaches 15..23
#: (23 is torch's declared maximum); below 15 conversion fails for CNN/LSTM and the exporter
#: silently keeps 18, which export_proto refuses rather than passing on.
OPSET_RANGES = {"torchscript": (7, 20), "dynamo": (15, 23)}
SUPPORTED_OPSETS = (
    min(lo for lo, _ in OPSET_RANGES.values()),
    max(hi for _, hi in OPSET_RANGES.values()),
)

STORAGE_MODES = ("dense", "sparse", "packed")
QUANTIZE_MODES = ("int8",)
QUANT_STORAGE = {"int8": ("packed",)}  # storage modes a quantize mode works with
MIN_OPSET = {"dense": 7, "sparse": 11, "packed": 11, "int8": 13}


def opset_ranges() -> str:
    """'torchscript 7..20, dynamo 15..23': the opsets each exporter writes, for messages."""
    return ", ".join(f"{k} {a}..{b}" for k, (a, b) in OPSET_RANGES.items())


def check_opset_supported(opset: object, floor: int = 0, what: str = "") -> int:
    """``opset`` as an int if some exporter of this torch writes it (``SUPPORTED_OPSETS``)
    and it is >= ``floor`` (the storage mode's minimum, named by ``what``).

    Raises SettingError naming the value and the valid range, per exporter.
    """
    lo, hi = SUPPORTED_OPSETS
    lo = max(lo, floor)
    whole = isinstance(opset, numbers.Integral) and not isinstance(opset, bool)  # not 18.0
    if not whole or not lo <= opset <= hi:
        torch_version = version("torch").split("+")[0]
        raise SettingError(
            f"opset {opset!r} is not one torch {torch_version}'s ONNX exporters write"
            f"{' for ' + what if what else ''}; valid: {lo}..{hi} ({opset_ranges()})"
        )
    return int(opset)


def check_modes(storage: str, quantize: str | None, opset: int | None = None) -> None:
    """Raise SettingError for an unknown storage/quantize name, a combination that fails,
    or (when given) an opset the exporters do not write or the storage cannot decode in."""
    if storage not in STORAGE_MODES:
        raise choice_error("storage mode", storage, STORAGE_MODES)
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise choice_error("quantize mode", quantize, QUANTIZE_MODES)
        if storage not in QUANT_STORAGE[quantize]:
            valid = ", ".join(QUANT_STORAGE[quantize])
            raise SettingError(
                f"quantize {quantize!r} does not work with storage {storage!r}; use storage {valid}"
            )
    if opset is not None:
        check_opset(opset, storage, quantize)


def check_opset(opset: int, storage: str, quantize: str | None) -> None:
    """Raise SettingError if ``opset`` lacks the operators the storage mode decodes with, or
    no exporter of this torch writes it (exporters.SUPPORTED_OPSETS); the message gives the
    valid range for this storage mode."""
    need = max(MIN_OPSET[storage], MIN_OPSET[quantize] if quantize else 0)
    lo, hi = SUPPORTED_OPSETS
    what = f"storage {storage!r}" + (f" with quantize {quantize!r}" if quantize else "")
    whole = isinstance(opset, numbers.Integral) and not isinstance(opset, bool)
    if whole and opset < need:
        raise SettingError(
            f"opset {opset} is too old for {what}; use opset >= {need} (valid: {max(lo, need)}"
            f"..{hi})"
        )
    check_opset_supported(opset, need, what)
