"""prunekit: training-aware unstructured pruning with Taylor/Fisher criteria.

Python API (mirrors the CLI): ``prune``, ``score``, ``fisher_diagonal``,
``ntk_alignment``, ``export_onnx``.
"""

from prunekit.errors import PrunekitError
from prunekit.pipeline import (
    PruneResult,
    PruneSettings,
    export_onnx,
    fisher_diagonal,
    ntk_alignment,
    prune,
    score,
)

__version__ = "0.1.0"

__all__ = [
    "PruneResult",
    "PruneSettings",
    "PrunekitError",
    "export_onnx",
    "fisher_diagonal",
    "ntk_alignment",
    "prune",
    "score",
]
