"""prunekit.export: sparse ONNX export that onnxruntime runs, with a verified receipt.

``export_onnx(model, path, example_input, storage="packed", ...) -> receipt dict``;
``write_receipt(receipt, path)`` writes export.json; ``receipt_table(receipt)`` gives the
rows a CLI prints. STORAGE_MODES / QUANTIZE_MODES list the valid CLI choices.
"""

from .core import default_targets, export_onnx
from .exporters import EXPORTERS
from .receipt import MEMORY_NOTE, receipt_table, write_receipt
from .storage import QUANTIZE_MODES, STORAGE_MODES, check_modes, pack, unpack

__all__ = [
    "EXPORTERS",
    "MEMORY_NOTE",
    "QUANTIZE_MODES",
    "STORAGE_MODES",
    "check_modes",
    "default_targets",
    "export_onnx",
    "pack",
    "receipt_table",
    "unpack",
    "write_receipt",
]
