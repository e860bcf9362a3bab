"""prunekit.export: sparse ONNX export that onnxruntime runs, with a verified receipt.

``export_onnx(model, path, example_input, storage="packed", ...) -> receipt dict``;
``write_receipt(receipt, path)`` writes export.json; ``receipt_table(receipt)`` gives the
rows a CLI prints. STORAGE_MODES / QUANTIZE_MODES list the valid CLI choices;
SUPPORTED_OPSETS / OPSET_RANGES the opsets torch's exporters write, which
``check_modes(storage, quantize, opset)`` checks up front. What the exporters print goes
to ``exporter_log_path(path)`` (``<path>.log``), never to the terminal.
"""

from .core import default_targets, export_onnx, exporter_log_path
from .exporters import EXPORTERS, OPSET_RANGES, SUPPORTED_OPSETS
from .receipt import MEMORY_NOTE, receipt_table, write_receipt
from .storage import QUANTIZE_MODES, STORAGE_MODES, check_modes, pack, unpack

__all__ = [
    "EXPORTERS",
    "MEMORY_NOTE",
    "OPSET_RANGES",
    "QUANTIZE_MODES",
    "STORAGE_MODES",
    "SUPPORTED_OPSETS",
    "check_modes",
    "default_targets",
    "export_onnx",
    "exporter_log_path",
    "pack",
    "receipt_table",
    "unpack",
    "write_receipt",
]
