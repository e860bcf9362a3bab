"""Verification of a written ONNX file, and latency measurement.

Verification never trusts the writer: it re-reads the file, runs onnx.checker, opens an
onnxruntime CPU session, compares outputs with the PyTorch pruned model and reads back the
decoded weights that onnxruntime actually computes.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from prunekit.errors import SettingError, VerificationError, first_line
from prunekit.types import call_model

from .modes import QuantizationRefused

FP32_TOL = 1e-5


def session(source: str | bytes) -> tuple[ort.InferenceSession, float]:
    """(CPU session, seconds to create it) with as many threads as torch uses.

    Spinning is off: onnxruntime's idle threads otherwise busy-wait after each run and
    starve PyTorch's threads when both are timed in one process.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    start = time.perf_counter()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - start


# onnxruntime input type -> numpy dtype to feed (anything else is fed as float32)
_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}  # fmt: skip


def _dtype(arg) -> type:
    return _NUMPY.get(arg.type, np.float32)


def n_rows(x: Tensor | dict[str, Tensor]) -> int:
    """Batch size (dim 0) of a tensor or of the first tensor of a dict."""
    return int((next(iter(x.values())) if isinstance(x, dict) else x).shape[0])


def feeds(sess: ort.InferenceSession, x: Tensor | dict[str, Tensor]) -> dict[str, np.ndarray]:
    """onnxruntime feeds: a tensor goes to the first graph input, a dict's entries to the
    graph inputs of the same names; each is cast to the numpy dtype its input declares
    (float32 for 'input', int64 for token ids, bool or int64 for masks as exported).
    Entries the graph does not take (inputs the model ignores) are left out."""
    inputs = sess.get_inputs()
    if not isinstance(x, dict):
        return {inputs[0].name: x.detach().cpu().numpy().astype(_dtype(inputs[0]))}
    missing = [i.name for i in inputs if i.name not in x]
    if missing:
        raise SettingError(
            f"inputs lack {missing} that the ONNX graph takes; given keys: {', '.join(x)}"
        )
    return {i.name: x[i.name].detach().cpu().numpy().astype(_dtype(i)) for i in inputs}


def _shapes(x: Tensor | dict[str, Tensor]) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in x.items())
    return str(tuple(x.shape))


def run_onnx(sess: ort.InferenceSession, x: Tensor | dict[str, Tensor]) -> np.ndarray:
    """First output of ``sess`` on input ``x`` (a tensor, or a dict of named inputs)."""
    return sess.run(None, feeds(sess, x))[0]


def run_torch(net: nn.Module, x: Tensor | dict[str, Tensor], call=None) -> np.ndarray:
    """First output of ``net`` on ``x`` in inference mode, as numpy: ``call(net, x)``, by
    default ``call_model`` (a dict is passed as keyword arguments)."""
    with torch.inference_mode():
        out = (call or call_model)(net, x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().cpu().numpy()


def check(model: onnx.ModelProto) -> str:
    """Run onnx.checker; full_check (with shape inference) unless the graph holds sparse
    initializers, which onnx's shape inference types as sparse tensors no op accepts.
    Returns 'full' or 'basic'."""
    full = len(model.graph.sparse_initializer) == 0
    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception as exc:  # checker raises several unrelated exception types
        raise VerificationError(f"onnx.checker rejected the exported model: {exc}") from exc
    return "full" if full else "basic"


def _accuracy(out: np.ndarray, targets: Tensor | None) -> float | None:
    if targets is None or out.ndim != 2:
        return None
    return float((out.argmax(-1) == targets.cpu().numpy()).mean())


def parity(
    sess: ort.InferenceSession,
    ref: nn.Module,
    inputs: Tensor | dict[str, Tensor],
    targets: Tensor | None,
    quantized: bool,
    max_accuracy_drop: float | None,
    call=None,
) -> dict:
    """Compare onnxruntime with the PyTorch pruned model on ``inputs`` [N, ...] (a tensor,
    or a dict of named tensors), the model fed through ``call`` (see :func:`run_torch`).

    fp32: max abs diff must be <= 1e-5 (VerificationError). quantized (int8-weights): the
    accuracy change (onnx - torch, as a fraction, on ``targets``) is reported; a drop of
    more than ``max_accuracy_drop`` points (if set) raises QuantizationRefused (exit 2).
    """
    feed = feeds(sess, inputs)
    try:
        got = sess.run(None, feed)[0]
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise VerificationError(
            "onnxruntime cannot run the exported model on the verification inputs "
            f"(shapes {_shapes(inputs)}): {first_line(exc)}"
        ) from exc
    want = run_torch(ref, inputs, call)
    if got.shape != want.shape:
        raise VerificationError(f"onnx output shape {got.shape} != pytorch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
    out = {"n_inputs": n_rows(inputs), "max_abs_diff": diff}
    if not np.isfinite(got).all():
        raise VerificationError("onnxruntime produced non-finite outputs")
    acc_t, acc_o = _accuracy(want, targets), _accuracy(got, targets)
    if acc_t is not None:
        out.update(accuracy_pytorch=acc_t, accuracy_onnx=acc_o, accuracy_change=acc_o - acc_t)
    if not quantized:
        out["tolerance"] = FP32_TOL
        if diff > FP32_TOL:
            raise VerificationError(
                f"export parity failed: max abs diff {diff:.3g} > {FP32_TOL:g} on "
                f"{out['n_inputs']} inputs"
            )
    elif max_accuracy_drop is not None and acc_t is not None:
        drop = 100.0 * (acc_t - acc_o)
        if drop > max_accuracy_drop:
            raise QuantizationRefused(
                f"int8-weights export refused: validation accuracy drops {drop:.2f} points "
                f"({acc_t:.4f} -> {acc_o:.4f}) > --max-accuracy-drop {max_accuracy_drop:g}; "
                "raise the limit or export without --quantize; nothing written"
            )
    return out


def _sparse_dense(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Dense arrays of the graph's sparse initializers (what onnxruntime densifies)."""
    out = {}
    for sp in model.graph.sparse_initializer:
        values, idx = numpy_helper.to_array(sp.values), numpy_helper.to_array(sp.indices)
        dense = np.zeros(int(np.prod(sp.dims)), dtype=values.dtype)
        dense[idx.reshape(-1)] = values
        out[sp.values.name] = dense.reshape(tuple(sp.dims))
    return out


def decoded_weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The tensors ``names`` as onnxruntime computes them from ``model``.

    Packed and dense tensors are read by exposing them as extra graph outputs of a copy and
    running it (so the real decoding subgraph runs); sparse initializers are densified
    from their values and indices (a sparse tensor cannot be a graph output).
    """
    sparse = _sparse_dense(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [n for n in names if n not in sparse]
    for name in wanted:
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    out = {n: sparse[n] for n in names if n in sparse}
    if wanted:
        sess, _ = session(probe.SerializeToString())
        zeros = {}  # any valid input: weights do not depend on it (dynamic dims -> 1)
        for inp in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            zeros[inp.name] = np.zeros(shape, _dtype(inp))
        values = sess.run(wanted, zeros)
        out.update(zip(wanted, values, strict=True))
    return out


def check_weights(model: onnx.ModelProto, expected: dict[str, tuple[np.ndarray, int]]) -> dict:
    """Each decoded tensor must equal its expected value and hold >= its mask's zeros.

    expected: onnx name -> (array the tensor must decode to, number of pruned entries).
    Returns {'tensors': n, 'zeros': decoded zero count, 'pruned': mask zero count}.
    """
    got = decoded_weights(model, list(expected))
    zeros = pruned = 0
    for name, (want, n_pruned) in expected.items():
        have = got[name]
        if have.shape != want.shape or not np.array_equal(have, want):
            bad = np.abs(have.astype(np.float64) - want).max() if have.shape == want.shape else -1
            raise VerificationError(
                f"decoded weight {name!r} differs from the pruned weight "
                f"(shape {have.shape} vs {want.shape}, max abs diff {bad:.3g})"
            )
        n_zero = int(have.size - np.count_nonzero(have))
        if n_zero < n_pruned:
            raise VerificationError(
                f"decoded weight {name!r} has {n_zero} zeros, fewer than its {n_pruned} "
                "pruned entries"
            )
        zeros, pruned = zeros + n_zero, pruned + n_pruned
    return {"tensors": len(expected), "zeros": zeros, "pruned": pruned}


def latency_ms(fn, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """p50/p90 wall time of ``fn()`` in milliseconds over ``runs`` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90))}


def batch_of(example: Tensor | dict[str, Tensor], size: int) -> Tensor | dict[str, Tensor]:
    """``size`` copies of the first example of ``example`` [N, ...] along dim 0 (of every
    tensor of a dict)."""
    if isinstance(example, dict):
        return {k: batch_of(v, size) for k, v in example.items()}
    return example[:1].expand(size, *example.shape[1:]).contiguous()


def latencies(
    sessions: dict, ref: nn.Module, example: Tensor | dict[str, Tensor], runs: int = 50, call=None
) -> dict:
    """{runner: {'batch1'|'batch64': {'p50_ms', 'p90_ms'}}} for onnx sessions and PyTorch.

    example: a tensor or a dict of named inputs, fed to ``ref`` through ``call`` (see
    :func:`run_torch`); its first example repeated makes each batch.
    """
    call = call or call_model
    out = {}
    for size in (1, 64):
        x = batch_of(example, size)
        for label, sess in sessions.items():
            out.setdefault(label, {})[f"batch{size}"] = latency_ms(
                lambda s=sess, f=feeds(sess, x): s.run(None, f), runs
            )
        with torch.inference_mode():
            timed = latency_ms(lambda x=x: call(ref, x), runs)
        out.setdefault("pytorch", {})[f"batch{size}"] = timed
    return out
