"""prunekit.export: sparse ONNX export that onnxruntime runs, with a verified receipt.

``export_onnx(model, path, example_input, storage="packed", ...) -> receipt dict``;
``write_receipt(receipt, receipt_path(path))`` writes it beside the model (``model.onnx``
-> ``model.onnx.json``); ``receipt_table(receipt)`` gives the rows a CLI prints;
``parse_dynamic_axes`` checks ``NAME:DIM`` specs of input axes that may change length.
STORAGE_MODES / QUANTIZE_MODES list the valid CLI choices (INT8_COMPUTE: the quantize
modes that compute in int8, verified against the fp32 graph and refused with
QuantizationRefused, exit 2, past ``max_accuracy_drop`` points; see export/int8.py);
SUPPORTED_OPSETS / OPSET_RANGES the opsets torch's exporters write, which
``check_modes(storage, quantize, opset)`` checks up front. What the exporters print goes
to ``exporter_log_path(path)`` (``<path>.log``), never to the terminal.

The mode names load without onnx (modes.py); everything else is imported on first use, so
validating a recipe or printing --help never loads onnx or onnxruntime.
"""

from importlib import import_module

from .modes import (
    DEFAULT_MAX_ACCURACY_DROP,
    EXPORTERS,
    INT8_COMPUTE,
    OPSET_RANGES,
    QUANTIZE_MODES,
    STORAGE_MODES,
    SUPPORTED_OPSETS,
    QuantizationRefused,
    check_accuracy_drop,
    check_modes,
)

_LAZY = {
    "default_targets": "core",
    "export_onnx": "core",
    "exporter_log_path": "receipt",
    "export_outputs": "receipt",
    "parse_dynamic_axes": "axes",
    "receipt_path": "receipt",
    "MEMORY_NOTE": "receipt",
    "receipt_table": "receipt",
    "write_receipt": "receipt",
    "pack": "storage",
    "unpack": "storage",
}

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "EXPORTERS",
    "INT8_COMPUTE",
    "MEMORY_NOTE",
    "OPSET_RANGES",
    "QUANTIZE_MODES",
    "QuantizationRefused",
    "STORAGE_MODES",
    "SUPPORTED_OPSETS",
    "check_accuracy_drop",
    "check_modes",
    "default_targets",
    "export_onnx",
    "export_outputs",
    "exporter_log_path",
    "pack",
    "parse_dynamic_axes",
    "receipt_path",
    "receipt_table",
    "unpack",
    "write_receipt",
]


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
