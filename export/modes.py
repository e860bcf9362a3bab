"""Export modes and opsets: the names the CLI and recipes validate against.

Kept apart from the exporters so that `prunekit --help` and `prunekit validate` check a
storage mode or an opset without importing onnx or onnxruntime.
"""

from __future__ import annotations

import math
import numbers
from importlib.metadata import version

from prunekit.errors import PrunekitError, SettingError, choice_error

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
#: int8 compute in onnxruntime (export/quantize.py): 'int8' = dynamic (the fastest measured;
#: static only for a conv-only graph), 'int8-static' = QDQ calibrated, convolutions too;
#: 'int8-weights' is storage only (packed int8 values with per-row scales, decoded to fp32
#: in-graph: smaller file, same fp32 compute and latency).
INT8_COMPUTE = ("int8", "int8-dynamic", "int8-static")
QUANTIZE_MODES = (*INT8_COMPUTE, "int8-weights")
# storage modes a quantize mode works with: an int8-compute graph stores its int8 weights
# packed where that is smaller (dense where not), so 'packed' covers both
QUANT_STORAGE = {mode: ("packed",) for mode in QUANTIZE_MODES}
# int8 compute: QuantizeLinear/DequantizeLinear with per-axis scales (opset 13)
MIN_OPSET = {"dense": 7, "sparse": 11, "packed": 11, **{mode: 13 for mode in QUANTIZE_MODES}}
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of validation accuracy (or 100 x cosine), int8 compute


class QuantizationRefused(PrunekitError):
    """An int8 export lost more validation accuracy (points) than allowed: nothing is
    written; exit 2. Defined here so callers catch it without importing onnx."""

    exit_code = 2


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


def check_accuracy_drop(value: object) -> float:
    """``value`` as a float if it is a finite number >= 0 (points of validation accuracy an
    int8 export may lose); SettingError naming the value otherwise."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise SettingError(
            f"max accuracy drop {value!r} must be a finite number of points >= 0 (e.g. 1.0 "
            "allows 97.5% -> 96.5%)"
        )
    return float(value)


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
