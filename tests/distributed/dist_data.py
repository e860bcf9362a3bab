"""Data functions for the multi-process tests (imported by `--data dist_data:NAME`)."""

from __future__ import annotations

import os

from prunekit.data import load_data


def digits():
    """The bundled digits, as a module:function spec."""
    return load_data("digits")


def fail_on_rank1():
    """Rank 1 of a torchrun job fails while loading data; other ranks get digits."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return load_data("digits")
