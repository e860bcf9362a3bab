"""prunekit: training-aware unstructured pruning with Taylor/Fisher criteria.

Python API (mirrors the CLI): ``prune``, ``score``, ``fisher_diagonal``,
``ntk_alignment``, ``export_onnx``; tasks ``Task`` (subclass it, or pass any object with
``forward`` and ``loss``), ``ClassificationTask``, ``RegressionTask``, ``DistillationTask``.
"""

import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads
# made one 785x785 eigh take 5-10 s instead of 0.1 s. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prunekit.api import (  # noqa: E402
    export_onnx,
    fisher_diagonal,
    ntk_alignment,
    prune,
    score,
)
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.settings import PruneResult, PruneSettings  # noqa: E402
from prunekit.tasks import DistillationTask  # noqa: E402
from prunekit.types import ClassificationTask, RegressionTask, Task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "DistillationTask",
    "PruneResult",
    "PruneSettings",
    "PrunekitError",
    "RegressionTask",
    "Task",
    "export_onnx",
    "fisher_diagonal",
    "ntk_alignment",
    "prune",
    "score",
]
