"""What the runtime really runs: which quantized ops became integer kernels, which stayed float.

A Q/DQ model says what may run in integers; onnxruntime decides what does. Its QDQ
transformers replace a group ``DQ(x), DQ(W) -> op [-> Q]`` with an integer kernel
(``QLinearConv``, ``QLinearMatMul``, ``MatMulIntegerToFloat``, ``QGemm``...) only where their
selectors match; a group they do not match keeps its ``DequantizeLinear`` nodes and runs the op
in float, dequantizing its weight on every run: slower than the float model it came from.

So the check asks the runtime: the model is loaded with every graph optimization on and the
graph onnxruntime will run is written out (``SessionOptions.optimized_model_filepath``). A
quantized op of the compiled model (``is_qdq_group``) runs as an integer kernel unless a
``DequantizeLinear`` it read still feeds a compute op there. onnxruntime keeps the names of
the nodes it does not fuse (a copy it makes of a shared DQ is named ``<name>/duplicated``),
which is how the two graphs are matched.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph.graph.model_io import serialize
from qgraph.graph.ops import QDQ_OPS, WEIGHTED_OPS, is_qoperator, qualified_op

DUPLICATE_MARK = "/duplicated"
DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size"}
)
"""Readers of a dequantized tensor that compute nothing (their output is read, not them)."""


@dataclasses.dataclass(frozen=True)
class FloatOp:
    """A quantized op of the compiled model that the runtime runs in float."""

    name: str
    op_type: str
    runs_as: str
    """The op onnxruntime runs in its place, as ``domain::op`` where not ONNX."""

    @property
    def reason(self) -> str:
        return (
            f"onnxruntime runs it as float {self.runs_as}, dequantizing its inputs on every run "
            "(no integer kernel matched its Q/DQ group)"
        )


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """How many quantized ops run as integer kernels, and the ones that do not."""

    quantized: int
    float_ops: tuple[FloatOp, ...]
    runtime_ops: dict[str, int]
    """Op histogram of the graph onnxruntime runs."""

    @property
    def integer(self) -> int:
        return self.quantized - len(self.float_ops)

    @property
    def complete(self) -> bool:
        return not self.float_ops

    def summary(self) -> str:
        line = f"{self.integer} of {self.quantized} quantized ops run as integer kernels"
        return line + " (onnxruntime's optimized graph)"

    def to_json(self) -> dict[str, object]:
        return {
            "quantized": self.quantized,
            "integer": self.integer,
            "float": [dataclasses.asdict(op) | {"reason": op.reason} for op in self.float_ops],
            "runtime_ops": self.runtime_ops,
        }


def optimized_graph(model: ir.Model | str | os.PathLike) -> onnx.GraphProto:
    """The graph onnxruntime's CPU provider runs for ``model``, all optimizations on."""
    with tempfile.TemporaryDirectory(prefix="qgraph-kernels-") as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        source = serialize(model) if isinstance(model, ir.Model) else os.fspath(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path), load_external_data=False).graph


def runtime_kernels(model: ir.Model) -> KernelReport:
    """Which quantized ops of ``model`` onnxruntime runs as integer kernels, on this host."""
    graph = optimized_graph(model)
    quantized = {n.name: n for n in model.graph if is_qdq_group(n)}
    weight_readers = _weight_dequantizer_readers(model)
    float_ops: dict[str, FloatOp] = {}
    for dq, reader in _float_readers_of_dequantizers(graph):
        if reader.name in quantized:
            names = [reader.name]
        elif dq.input[0] in {i.name for i in graph.initializer}:
            names = weight_readers.get(dq.name.split(DUPLICATE_MARK)[0], [])
        else:
            continue
        for name in names:
            node = quantized[name]
            float_ops.setdefault(name, FloatOp(name, node.op_type, _onnx_op_key(reader)))
    histogram = collections.Counter(_onnx_op_key(n) for n in graph.node)
    return KernelReport(len(quantized), tuple(float_ops.values()), dict(histogram.most_common()))


def is_qdq_group(node: ir.Node) -> bool:
    """``node`` is a quantized op: an integer operator (QOperator format), the op of a Q/DQ
    group reading a dequantized constant (a weight), or a matrix product or convolution
    reading dequantized tensors only."""
    if node.op_type in QDQ_OPS:
        return False
    if is_qoperator(node.op_type):
        return node.op_type != "DynamicQuantizeLinear"
    producers = [v.producer() if v is not None else None for v in node.inputs]
    dequantized = [p is not None and p.op_type == "DequantizeLinear" for p in producers]
    if any(d and _dequantizes_constant(p) for d, p in zip(dequantized, producers, strict=True)):
        return True
    return node.op_type in WEIGHTED_OPS and bool(dequantized) and all(dequantized)


def _dequantizes_constant(dequantize: ir.Node) -> bool:
    """The DQ reads a constant, or a constant moved by data-movement ops (a tied projection's
    ``Transpose(E_q)``), which onnxruntime folds into one."""
    value, depth = dequantize.inputs[0], 0
    while value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in DATA_MOVEMENT_OPS or depth >= 4:
            return False
        value, depth = producer.inputs[0], depth + 1
    return True


def _weight_dequantizer_readers(model: ir.Model) -> dict[str, list[str]]:
    """Name of each DQ of a constant -> the names of the ops reading it."""
    found = {}
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and _dequantizes_constant(node):
            found[node.name] = [use.node.name for use in node.outputs[0].uses()]
    return found


def _float_readers_of_dequantizers(
    graph: onnx.GraphProto,
) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(DQ, compute op) for every ``DequantizeLinear`` whose output a compute op still reads."""
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return [
        (node, reader)
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        for reader in _compute_readers(node.output[0], readers)
    ]


def _compute_readers(
    name: str, readers: dict[str, list[onnx.NodeProto]], depth: int = 0
) -> list[onnx.NodeProto]:
    """The ops that compute with tensor ``name``, looking through data-movement ops."""
    found = []
    for reader in readers.get(name, []):
        if reader.op_type in DATA_MOVEMENT_OPS and depth < 4:
            found += _compute_readers(reader.output[0], readers, depth + 1)
        elif reader.op_type not in QDQ_OPS:
            found.append(reader)
    return found


def _onnx_op_key(node: onnx.NodeProto) -> str:
    return qualified_op(node.domain, node.op_type)


__all__ = ["FloatOp", "KernelReport", "optimized_graph", "runtime_kernels"]
