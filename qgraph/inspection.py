"""What a model holds: ops, parameters, interface, and how much of it is quantized.

Summaries read shapes and dtypes only, never tensor data, so inspecting a multi-GB model with
external data costs no more than reading its graph.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
from collections.abc import Iterator

import onnx_ir as ir

from qgraph.graph.model_io import SOURCE_PATH_KEY
from qgraph.graph.ops import ONNX_DOMAINS, QDQ_OPS, is_qoperator, qualified_op
from qgraph.graph.traversal import all_nodes
from qgraph.pipeline import PROVENANCE_KEY

TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
"""Node metadata of torch's dynamo exporter: the module path a node came from."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A graph input or output."""

    name: str
    dtype: str
    shape: list[int | str] | None


@dataclasses.dataclass(frozen=True)
class ParameterStats:
    """Constant tensors of one dtype."""

    dtype: str
    tensors: int
    elements: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """The facts ``qgraph inspect`` reports about a model."""

    source: str | None
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: int
    op_histogram: dict[str, int]
    parameters: list[ParameterStats]
    quantize_nodes: int
    dequantize_nodes: int
    quantized_ops: dict[str, int]

    @property
    def parameter_count(self) -> int:
        return sum(p.elements for p in self.parameters)

    @property
    def parameter_bytes(self) -> int:
        return sum(p.bytes for p in self.parameters)

    def to_json(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["parameter_count"] = self.parameter_count
        data["parameter_bytes"] = self.parameter_bytes
        return data


def summarize(model: ir.Model) -> ModelSummary:
    """The summary of ``model``; tensor data is never read."""
    nodes = list(all_nodes(model.graph))
    ops = collections.Counter(op_key(node) for node in nodes)
    quantized = collections.Counter(op_key(node) for node in nodes if is_quantized_op(node))
    return ModelSummary(
        source=model.meta.get(SOURCE_PATH_KEY),
        ir_version=model.ir_version,
        producer=" ".join(filter(None, [model.producer_name, model.producer_version])),
        opsets={domain or "ai.onnx": v for domain, v in sorted(model.opset_imports.items())},
        inputs=[
            _tensor_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers
        ],
        outputs=[_tensor_info(v) for v in model.graph.outputs],
        nodes=len(nodes),
        op_histogram=dict(ops.most_common()),
        parameters=_parameter_stats(model),
        quantize_nodes=sum(1 for n in nodes if n.op_type == "QuantizeLinear"),
        dequantize_nodes=sum(1 for n in nodes if n.op_type == "DequantizeLinear"),
        quantized_ops=dict(quantized.most_common()),
    )


def op_key(node: ir.Node) -> str:
    """``Conv`` for ONNX ops, ``com.microsoft::QGemm`` for others."""
    return qualified_op(node.domain, node.op_type)


def is_quantized_op(node: ir.Node) -> bool:
    """An integer operator, or a float op reading a dequantized tensor (a Q/DQ group)."""
    if node.op_type in QDQ_OPS:
        return False
    if is_qoperator(node.op_type):
        return True
    return reads_dequantized(node)


def reads_dequantized(node: ir.Node) -> bool:
    """``node`` reads a DequantizeLinear output (a float op of a Q/DQ group, or a Q/DQ op)."""
    return any(
        value is not None
        and (producer := value.producer()) is not None
        and producer.op_type == "DequantizeLinear"
        for value in node.inputs
    )


def torch_name_scopes(node: ir.Node) -> list[str]:
    """The module path torch's exporter recorded for ``node`` (``['', 'model', 'model.layers.0',
    ..., 'linear']``, the op last), or [] where there is none."""
    scopes = node.metadata_props.get(TORCH_SCOPES_KEY)
    if not scopes:
        return []
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return []
    return [str(part) for part in parts] if isinstance(parts, list) else []


def _tensor_info(value: ir.Value) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    shape = None if value.shape is None else [_dim(d) for d in value.shape]
    return TensorInfo(value.name or "", dtype, shape)


def _dim(dim: int | ir.SymbolicDim) -> int | str:
    if isinstance(dim, int):
        return dim
    return dim.value if dim.value is not None else "?"


def constant_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Initializers of every graph and tensors held by ``Constant`` nodes."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in all_nodes(model.graph):
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                yield attr.as_tensor()


def _parameter_stats(model: ir.Model) -> list[ParameterStats]:
    tensors: collections.Counter[str] = collections.Counter()
    elements: collections.Counter[str] = collections.Counter()
    nbytes: collections.Counter[str] = collections.Counter()
    for tensor in constant_tensors(model):
        dtype = tensor.dtype.name.lower()
        tensors[dtype] += 1
        elements[dtype] += tensor.size
        nbytes[dtype] += tensor.nbytes
    return [
        ParameterStats(dtype, tensors[dtype], elements[dtype], nbytes[dtype])
        for dtype, _ in nbytes.most_common()
    ]


# Differences between two models


@dataclasses.dataclass(frozen=True)
class OpChange:
    """How often one op occurs before and after."""

    op: str
    before: int
    after: int


@dataclasses.dataclass(frozen=True)
class ModelDiff:
    """What changed from one model to another (typically a float model and its compile).

    Attributes:
        before, after: The two models' summaries.
        ops: Every op whose count changed.
        created_by_pass: Pass -> op -> nodes of ``after`` that pass created (the provenance
            qgraph records in node metadata; empty for models from other tools).
        quantized_tensors: (kind, spec) -> how many tensors ``after`` dequantizes that way;
            kind is ``weight`` (a constant) or ``activation``.
    """

    before: ModelSummary
    after: ModelSummary
    ops: list[OpChange]
    created_by_pass: dict[str, dict[str, int]]
    quantized_tensors: dict[tuple[str, str], int]

    @property
    def size_ratio(self) -> float:
        return self.after.parameter_bytes / max(self.before.parameter_bytes, 1)

    def to_json(self) -> dict[str, object]:
        return {
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "ops": [dataclasses.asdict(change) for change in self.ops],
            "created_by_pass": self.created_by_pass,
            "quantized_tensors": [
                {"kind": kind, "spec": spec, "count": count}
                for (kind, spec), count in self.quantized_tensors.items()
            ],
            "size_ratio": self.size_ratio,
        }


def diff_models(before: ir.Model, after: ir.Model) -> ModelDiff:
    """What changed from ``before`` to ``after``; tensor data is never read."""
    old, new = summarize(before), summarize(after)
    ops = [
        OpChange(op, old.op_histogram.get(op, 0), new.op_histogram.get(op, 0))
        for op in sorted(set(old.op_histogram) | set(new.op_histogram))
        if old.op_histogram.get(op, 0) != new.op_histogram.get(op, 0)
    ]
    created: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in all_nodes(after.graph):
        pass_name = node.metadata_props.get(PROVENANCE_KEY)
        if pass_name is not None:
            created[pass_name][op_key(node)] += 1
    specs = collections.Counter(
        dequantized_spec(node)
        for node in all_nodes(after.graph)
        if node.op_type == "DequantizeLinear"
    )
    return ModelDiff(
        old,
        new,
        ops,
        {name: dict(counts.most_common()) for name, counts in created.items()},
        dict(specs.most_common()),
    )


def dequantized_spec(node: ir.Node) -> tuple[str, str]:
    """(``weight`` or ``activation``, ``int8 per-channel(axis 1)``-style text) of the tensor a
    DequantizeLinear reads, from its dtype and attributes."""
    source = node.inputs[0]
    kind = "weight" if source is not None and source.const_value is not None else "activation"
    dtype = source.dtype.name.lower() if source is not None and source.dtype else "?"
    scale = node.inputs[1]
    axis = node.attributes.get("axis")
    block = node.attributes.get("block_size")
    per_tensor = scale is None or scale.shape is None or scale.shape.numpy() in ((), (1,))
    if block is not None and block.as_int() > 0:
        granularity = f"per-block({block.as_int()}, axis {axis.as_int() if axis else 1})"
    elif per_tensor:
        granularity = "per-tensor"
    else:
        granularity = f"per-channel(axis {axis.as_int() if axis else 1})"
    return kind, f"{dtype} {granularity}"
