"""The ``synthetic`` data spec: options checked against documented bounds, then drawn.

``synthetic[?n=..&dim=..&classes=..&task=classification|regression&seed=..]`` draws
Gaussian inputs (n, dim) and labels argmax(x @ w) (classification) or targets
tanh(x @ w) + noise (regression, ``classes`` outputs); ``task=tokens&seq=..&vocab=..
[&labels=no]`` draws padded token ids and attention masks. Every option is a whole number
within ``SYNTHETIC_BOUNDS`` and the arrays drawn stay within ``SYNTHETIC_MAX_BYTES``, so a
typo such as ``n=10**9`` fails in one DataError line, not in a MemoryError.
"""

from __future__ import annotations

import numpy as np

from prunekit.errors import DataError
from prunekit.limits import MAX_EXAMPLES

SYNTHETIC_MAX_ROWS = MAX_EXAMPLES  # 10,000,000: the same bound as --score-examples
SYNTHETIC_MAX_BYTES = 2 * 2**30  # the arrays ``synthetic`` draws (float64/int64 as drawn)
#: option -> (minimum, maximum) for the whole-number options of ``synthetic``; far above
#: any useful value, so that a typo fails in one line instead of in a MemoryError.
SYNTHETIC_BOUNDS = {
    "n": (3, SYNTHETIC_MAX_ROWS),
    "dim": (1, 1_000_000),
    "classes": (1, 10_000),
    "seed": (0, 2**63 - 1),
    "seq": (2, 100_000),
    "vocab": (2, 10_000_000),
}
_SYNTHETIC_KEYS = {
    "classification": ("n", "dim", "classes", "task", "seed"),
    "regression": ("n", "dim", "classes", "task", "seed"),
    "tokens": ("n", "classes", "task", "seed", "seq", "vocab", "labels"),
}
_SYNTHETIC_DEFAULTS = {"n": 2000, "dim": 20, "classes": 4, "seed": 1234, "seq": 24, "vocab": 64}


def _synthetic_tokens(n: int, classes: int, seed: int, seq: int, vocab: int, labels: bool):
    """Padded token sequences {input_ids, attention_mask}; the class of a sequence is the
    most frequent (token id mod classes) among its real tokens (labels False: inputs only)."""
    rng = np.random.default_rng(seed)
    if vocab < classes + 1 or classes < 2:
        raise DataError(f"synthetic tokens need seq >= 2, classes >= 2, vocab > classes; got "
                        f"seq={seq}, classes={classes}, vocab={vocab}")  # fmt: skip
    lengths = rng.integers(max(1, seq // 4), seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (n, seq)) * mask  # 0 = padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    if not labels:
        return inputs, None
    # counts[i, c] = real tokens of row i with id % classes == c, in one pass over the ids
    slot = np.arange(n)[:, None] * classes + ids % classes
    counts = np.bincount(slot[mask == 1], minlength=n * classes).reshape(n, classes)
    return inputs, counts.argmax(1)


def _synthetic(n: int, classes: int, task: str, seed: int, dim: int = 0, **tokens):
    """(x, y) of a checked ``synthetic`` spec (options from :func:`synthetic_options`)."""
    if task == "tokens":
        return _synthetic_tokens(n, classes, seed, **tokens)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal((dim, max(classes, 1))).astype(np.float32)
    if task == "regression":
        return x, np.tanh(x @ w) + 0.05 * rng.standard_normal((n, w.shape[1]))
    return x, (x @ w).argmax(1)


def _bounded_int(spec: str, key: str, text: str) -> int:
    low, high = SYNTHETIC_BOUNDS[key]
    try:
        value = int(text.strip())  # '1.5', '1e9', '10**9' are refused, never rounded
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise DataError(
            f"data spec {spec!r}: {key}={text!r} must be a whole number in [{low:,}, {high:,}]"
        )
    return value


def _synthetic_bytes(opts: dict) -> int:
    """Bytes of the arrays a synthetic spec draws (float64/int64 as numpy draws them)."""
    n, classes = opts["n"], opts["classes"]
    if opts["task"] == "tokens":
        return 8 * n * (3 * opts["seq"] + classes)  # ids, mask, draws; label counts
    return 8 * (n * (opts["dim"] + classes) + opts["dim"] * classes)


def synthetic_options(spec: str, args: dict[str, str]) -> dict:
    """The checked options of a ``synthetic`` spec, defaults filled in.

    args: key -> text after ``?``. Whole numbers within ``SYNTHETIC_BOUNDS``; task one of
    classification, regression, tokens (each with its own keys); labels yes/no (tokens);
    classes >= 2 to classify; the arrays drawn within ``SYNTHETIC_MAX_BYTES``. Raises one
    DataError naming the option and its valid values.
    """
    task = args.get("task", "classification")
    if task not in _SYNTHETIC_KEYS:
        raise DataError(
            f"data spec {spec!r}: task {task!r} is not one of {', '.join(_SYNTHETIC_KEYS)}"
        )
    valid = _SYNTHETIC_KEYS[task]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise DataError(
            f"data spec {spec!r}: unknown option {unknown[0]!r} for task {task}; valid: "
            f"{', '.join(valid)}"
        )
    opts = {k: v for k, v in _SYNTHETIC_DEFAULTS.items() if k in valid}
    opts.update({k: _bounded_int(spec, k, v) for k, v in args.items() if k in SYNTHETIC_BOUNDS})
    opts["task"] = task
    if task == "tokens":
        text = args.get("labels", "yes").lower()
        if text not in ("yes", "no", "true", "false", "1", "0"):
            raise DataError(f"data spec {spec!r}: labels={text!r} must be yes or no")
        opts["labels"] = text in ("yes", "true", "1")
    elif task == "classification" and opts["classes"] < 2:
        raise DataError(f"data spec {spec!r}: classes={opts['classes']} must be >= 2 to classify")
    size = _synthetic_bytes(opts)
    if size > SYNTHETIC_MAX_BYTES:
        sizes = ("n", "dim", "seq", "classes")
        shown = ", ".join(f"{k}={v:,}" for k, v in opts.items() if k in sizes)
        raise DataError(
            f"data spec {spec!r}: {shown} would draw {size / 2**30:,.1f} GiB of arrays; the bound "
            f"is {SYNTHETIC_MAX_BYTES / 2**30:g} GiB (lower n, dim, seq or classes)"
        )
    return opts


def synthetic_arrays(spec: str, args: dict[str, str]) -> tuple:
    """(x, y) of a ``synthetic`` spec: x (n, dim) float32 or {input_ids, attention_mask}
    (n, seq) int64; y (n,) int64 labels, (n, classes) float64 targets or None."""
    return _synthetic(**synthetic_options(spec, args))
