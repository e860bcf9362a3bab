"""int8 compute: an fp32 ONNX graph rewritten by onnxruntime.quantization.

Two methods (measured in BENCHMARKS.md, section "int8 compute in the exported model"):

- ``dynamic``: weights int8 (symmetric, per tensor), activations quantized at run time
  (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime into DynamicQuantizeMatMul).
  MatMul and Gemm only (Gemm is rewritten to MatMul + Add first: onnxruntime's dynamic
  quantizer skips Gemm). Conv stays fp32: ConvInteger measured 7-12x slower than fp32 Conv.
- ``static``: QDQ format, weights int8 per output channel (symmetric), activations uint8
  with ranges calibrated (MinMax) on a few hundred seeded training examples; MatMul, Gemm
  and Conv (Relu and MaxPool between them stay int8); onnxruntime fuses the Q/DQ pairs
  into QLinearConv / QLinearMatMul / QGemm.

``int8`` is dynamic: the fastest at equal accuracy on every bench model (MLP 0.3x fp32 at
batch 64, encoder 0.35x; on the small MNIST CNN static QLinearConv was 2-3x *slower* than
onnxruntime's fp32 convolutions, dynamic with fp32 convolutions faster than fp32). Only a
graph with convolutions and no MatMul/Gemm falls back to static. Symmetric int8 weights
keep pruned zeros exactly zero.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from prunekit.errors import ModelError

DYNAMIC_OPS = ("MatMul",)
STATIC_OPS = ("MatMul", "Gemm", "Conv")
# also quantized by static QDQ so that Conv -> Relu -> MaxPool stays in int8: without them
# each ReLU/MaxPool is a Dequantize/Quantize round trip (measured 5.5 -> 3.4 ms, MNIST CNN)
STATIC_PASS_THROUGH = ("Relu", "MaxPool")
#: node types that compute in int8 (what tests and the receipt count)
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear",
               "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "QGemm")  # fmt: skip
CALIBRATION_EXAMPLES = 256
CALIBRATION_BATCH = 32


def method_for(quantize: str, proto: onnx.ModelProto) -> str:
    """'dynamic' or 'static' for a quantize mode: 'int8-dynamic' / 'int8-static' as named;
    'int8' is dynamic (the fastest measured), static only for a graph whose sole
    quantizable nodes are convolutions (no MatMul/Gemm for dynamic to quantize)."""
    if quantize == "int8-dynamic":
        return "dynamic"
    if quantize == "int8-static":
        return "static"
    ops = {n.op_type for n in proto.graph.node}
    return "static" if "Conv" in ops and not ops & {"MatMul", "Gemm"} else "dynamic"


def gemm_to_matmul(proto: onnx.ModelProto) -> int:
    """Rewrite, in place, every Gemm whose B is an initializer (alpha = beta = 1, A not
    transposed) as MatMul(A, B') [+ Add(C)], B' = B transposed if transB. Returns how many.

    onnxruntime's dynamic quantizer handles MatMul but not Gemm (what torch exports for a
    Linear layer on 2-D inputs). The result is the same function: A [N, K] @ B' [K, M] + C.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    nodes, done = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        simple = plain and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not simple:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = node.input[1] if readers[node.input[1]] == 1 else f"{node.input[1]}__mm{done}"
        if name in inits:  # the only reader: replace it (its name stays, its layout is [K, M])
            inits[name].CopyFrom(numpy_helper.from_array(weight, name))
        else:
            graph.initializer.append(numpy_helper.from_array(weight, name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}__mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product]))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = batches
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop onnxruntime.quantization's advice lines (it logs them on the root logger: 'run
    pre-processing before quantization'); prunekit's exports are already shape-inferred."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_proto(
    proto: onnx.ModelProto, method: str, calibration: list[dict[str, np.ndarray]] | None
) -> onnx.ModelProto:
    """The int8 version of the fp32 graph ``proto`` (left untouched) by ``method``.

    calibration: feed dicts (graph input name -> array [n, ...]) for 'static'; ignored by
    'dynamic'. Raises ModelError when the graph has no node the method quantizes.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    work = onnx.ModelProto()
    work.CopyFrom(proto)
    if method == "dynamic":
        gemm_to_matmul(work)
    ops = DYNAMIC_OPS if method == "dynamic" else STATIC_OPS
    if not any(n.op_type in ops for n in work.graph.node):
        kinds = ", ".join(sorted({n.op_type for n in work.graph.node})[:12])
        raise ModelError(
            f"int8 {method} quantization finds no {'/'.join(ops)} node to quantize in this "
            f"graph (it has {kinds}); export without --quantize or with --quantize int8-weights"
        )
    with tempfile.TemporaryDirectory(prefix="prunekit-int8-") as tmp, _quiet_quantizer():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(work, src)
        if method == "dynamic":
            quantize_dynamic(src, dst, op_types_to_quantize=list(ops),
                             weight_type=QuantType.QInt8, per_channel=False)  # fmt: skip
        else:
            quantize_static(
                src, dst, _Reader(calibration or []), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=[*ops, *STATIC_PASS_THROUGH], per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                extra_options={"WeightSymmetric": True},
            )  # fmt: skip
        return onnx.load_model(dst)


def calibration_batches(
    feed_fn, inputs, n: int = CALIBRATION_EXAMPLES, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Feed dicts of at most ``n`` examples of ``inputs`` [N, ...] (a tensor or a dict of
    tensors), drawn without replacement by a generator seeded with ``seed``, in batches of
    CALIBRATION_BATCH. feed_fn(x) -> feed dict (verify.feeds bound to an fp32 session)."""
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    total = int(first.shape[0])
    order = np.random.default_rng(seed).permutation(total)[: min(n, total)]
    out = []
    for start in range(0, order.size, CALIBRATION_BATCH):
        rows = np.sort(order[start : start + CALIBRATION_BATCH])
        part = {k: v[rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[rows]
        out.append(feed_fn(part))
    return out


def integer_ops(proto: onnx.ModelProto) -> dict[str, int]:
    """Counts of the int8-compute node types (INTEGER_OPS) in ``proto``."""
    counts = Counter(n.op_type for n in proto.graph.node if n.op_type in INTEGER_OPS)
    return dict(sorted(counts.items()))


COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN")


def left_fp32(proto: onnx.ModelProto) -> dict[str, int]:
    """Counts of the heavy node types (COMPUTE_OPS) still computing in fp32 in the
    quantized ``proto``: those none of whose inputs comes out of a DequantizeLinear (QDQ
    nodes that onnxruntime fuses into int8 kernels). Dynamic quantization replaces the
    nodes it quantizes (MatMulInteger), so what remains is fp32: convolutions and recurrent
    layers under dynamic, recurrent layers and what calibration skipped under static."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = Counter(
        n.op_type
        for n in proto.graph.node
        if n.op_type in COMPUTE_OPS and not dequantized.intersection(n.input)
    )
    return dict(sorted(counts.items()))


def int8_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Name -> array of the INT8 initializers (the quantized weights) of ``proto``."""
    return {
        t.name: numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    }
