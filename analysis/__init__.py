"""Read-only diagnostics: tangent-kernel (NTK) alignment, probe sets and run plots."""

from prunekit.analysis.ntk import ntk_alignment, tangent_kernel
from prunekit.analysis.plots import plot_run
from prunekit.analysis.probe import log_spaced_iterations, ntk_record, select_probe

__all__ = [
    "log_spaced_iterations",
    "ntk_alignment",
    "ntk_record",
    "plot_run",
    "select_probe",
    "tangent_kernel",
]
