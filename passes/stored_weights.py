"""Stored weights: 8-bit storage for the weights of ops that compute in float.

The accuracy plan keeps some ops in float: 8 bits would not speed them up on the target, or
their 8-bit activations cost the budget too much. Their weights can still be stored in 8 bits,
per output channel ``c``, symmetric:

    s_c = max_k |W_ck| / 127,    W_q = round(W / s_c) in [-127, 127],    W' = s_c W_q

written in place of ``W`` as ``Mul(Cast(W_q, float), s)``. Both inputs are constants, so
onnxruntime folds the two ops when it loads the model (constant folding, a basic optimization,
which runs before the graph is split between execution providers) and runs the op in float on
``W'``, as fast as on ``W``: the file shrinks from 4 bytes a weight to 1, the session's memory
does not. A ``DequantizeLinear`` would not do: onnxruntime does not fold one (it keeps Q/DQ
for its fusions), so the op would dequantize its weight on every run (a Conv of magika's
shape ran 47% slower so, one thread).

A weight read through a ``Transpose`` is stored as the constant the ``Transpose`` reads, per
slice of the axis that becomes the op's output channels. A ``Gather`` may read the same
constant as its table (an output projection tied to the embedding, ``E^T``): stored per row of
``E``, which is per output channel of the projection, its rows are rounded alike. Any other
reader keeps the weight float.

Each weight moves by at most half a step, ``|W - W'| <= s_c / 2``, so an output of a MatMul,
Gemm or Conv moves by at most ``(s_c / 2) sum_k |x_k|`` over the inputs ``x_k`` it sums.

Where onnxruntime can be asked (a CPU target of this host's architecture, as for the runtime
check), the pass reads the graph onnxruntime will run and gives back its float weight to any op
whose ``Cast`` survived there: that op would expand its weight on every run.
"""

from __future__ import annotations

import dataclasses
import logging
import platform

import numpy as np
import onnx_ir as ir

from qgraph.graph.building import fresh_initializer
from qgraph.kernels import optimized_graph
from qgraph.passes.annotate import WEIGHT_LAYOUTS
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.spec import QuantSpec, quantize_weight
from qgraph.sections import counted, format_bytes
from qgraph.targets import TargetSpec, same_arch

logger = logging.getLogger(__name__)

STORED_OPS = frozenset({"Conv", "MatMul", "Gemm"})
"""The ops whose weights can be stored in 8 bits: those with one output-channel axis."""
STORAGE = QuantSpec(ir.DataType.INT8, symmetric=True)
"""Symmetric int8 with zero point 0: ``Cast`` and one ``Mul`` expand it (per-channel axis set
per op)."""


@dataclasses.dataclass(frozen=True)
class StoredWeightsReport:
    """Which float ops read 8-bit stored weights, what that saved, and what was declined."""

    stored: tuple[str, ...]
    float_bytes: int
    """The stored weights' size in float32."""
    stored_bytes: int
    """Their size in 8 bits, with their scales."""
    declined: dict[str, str] = dataclasses.field(default_factory=dict)
    """Node name -> why its weight stays float."""
    checked: bool = False
    """onnxruntime was asked whether it folds every expansion at load."""
    tables: tuple[str, ...] = ()
    """Gathers reading a stored weight as their table (tied to a projection)."""

    def summary(self) -> str:
        if not self.stored:
            return f"no float op's weight stored in 8 bits{self._declined()}"
        folded = (
            "onnxruntime expands them once, at load (checked)"
            if self.checked
            else "expanded by constant folding at load (not checked on this host)"
        )
        tables = f", and the embedding tables of {len(self.tables)} Gather" if self.tables else ""
        tables += "s" if len(self.tables) > 1 else ""
        return (
            f"the weights of {counted(len(self.stored), 'float op')} stored in 8 bits{tables} "
            f"({format_bytes(self.float_bytes)} -> {format_bytes(self.stored_bytes)}): "
            f"{folded}{self._declined()}"
        )

    def _declined(self) -> str:
        if not self.declined:
            return ""
        name, why = next(iter(self.declined.items()))
        return f"; {len(self.declined)} declined (e.g. '{name}': {why})"


@dataclasses.dataclass(frozen=True)
class _Source:
    """The float constant behind an op's weight (the weight itself, or what a ``Transpose``
    reads) and the constant's axis that holds the op's output channels."""

    value: ir.Value
    axis: int


@dataclasses.dataclass
class _Stored:
    """One constant stored in 8 bits: its float tensor, its expansion, what reads it."""

    original: ir.Value
    expanded: ir.Value
    quantized: ir.Value
    readers: list[str]
    """The named ops whose weight it is."""
    tables: list[str]
    """Gathers reading it as their table (a projection's weight tied to an embedding)."""


class StoredWeightsPass(ir.passes.InPlacePass):
    """Store in 8 bits the weights of the named float ops (module docstring)."""

    def __init__(self, nodes: tuple[str, ...], target: TargetSpec) -> None:
        super().__init__()
        self.nodes = nodes
        self.target = target

    def call(self, model: ir.Model) -> ReportingPassResult:
        by_name = {node.name: node for node in model.graph}
        asked = set(self.nodes)
        declined: dict[str, str] = {}
        sources: dict[str, tuple[_Source, list[str]]] = {}
        for name in self.nodes:
            found = _source(by_name[name], asked) if name in by_name else "not in the graph"
            if isinstance(found, str):
                declined[name] = found
            elif sources.setdefault(found.value.name, (found, []))[0].axis != found.axis:
                declined[name] = "another op reads its weight with other output channels"
            else:
                sources[found.value.name][1].append(name)
        weights = [_store(model.graph, source, readers) for source, readers in sources.values()]
        checked = self._can_ask_runtime() and bool(weights)
        if checked:
            declined.update(_unfolded(model, weights))
        stored = [w for w in weights if w.readers]
        report = StoredWeightsReport(
            tuple(name for w in stored for name in w.readers),
            sum(4 * w.original.const_value.size for w in stored),
            sum(_stored_bytes(w) for w in stored),
            declined,
            checked,
            tuple(name for w in stored for name in w.tables),
        )
        return ReportingPassResult(model, bool(stored), report)

    def _can_ask_runtime(self) -> bool:
        return self.target.kernels.runtime_checked and same_arch(
            self.target.arch, platform.machine()
        )


def _source(node: ir.Node, asked: set[str]) -> _Source | str:
    """The constant behind ``node``'s weight, or why it cannot be stored in 8 bits."""
    if node.op_type not in STORED_OPS or node.domain != "":
        return f"{node.op_type} has no output-channel axis qgraph stores by"
    value = node.inputs[WEIGHT_LAYOUTS[node.op_type].weight]
    axis = WEIGHT_LAYOUTS[node.op_type].channel_axis(node)
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        if not _read_only_by(producer.outputs[0], asked):
            return "its transposed weight is read by another op too"
        rank = len(producer.inputs[0].shape or ())
        axis = producer.attributes.get_ints("perm", list(range(rank))[::-1])[axis]
        value = producer.inputs[0]
    if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
        return "its weight is not a float32 constant"
    if value.is_graph_input() or value.is_graph_output():
        return "its weight is also a graph input or output"
    if node.op_type != "Conv" and len(value.const_value.shape) != 2:
        return "its weight is not a matrix"
    for use in value.uses():
        if not _may_read(use.node, use.idx, axis, asked):
            return f"'{use.node.name}' reads the same weight in float"
    return _Source(value, axis)


def _read_only_by(value: ir.Value, asked: set[str]) -> bool:
    return all(use.node.name in asked for use in value.uses())


def _may_read(reader: ir.Node, index: int, axis: int, asked: set[str]) -> bool:
    """``reader`` may read the constant stored per slice of ``axis``: a named op, a
    ``Transpose`` only named ops read, or a ``Gather`` of rows stored per row."""
    if reader.name in asked:
        return True
    if reader.op_type == "Transpose" and reader.domain == "":
        return _read_only_by(reader.outputs[0], asked)
    return _is_table_read(reader, index) and axis == 0


def _is_table_read(reader: ir.Node, index: int) -> bool:
    return (
        reader.op_type == "Gather"
        and reader.domain == ""
        and index == 0
        and reader.attributes.get_int("axis", 0) == 0
    )


def _store(graph: ir.Graph, source: _Source, readers: list[str]) -> _Stored:
    """``source``'s constant as ``Mul(Cast(W_q), s)``, per slice of its axis, read instead
    of it everywhere; the two nodes go first in the graph (they read constants only)."""
    value, array = source.value, source.value.const_value.numpy()
    quantized = quantize_weight(array, dataclasses.replace(STORAGE, axis=source.axis))
    shape = [1] * array.ndim
    shape[source.axis] = -1
    values = fresh_initializer(graph, f"{value.name}_stored", quantized.values, ir.DataType.INT8)
    scale = fresh_initializer(
        graph, f"{value.name}_stored_scale", quantized.scale.astype(np.float32).reshape(shape)
    )
    cast = ir.Node(
        "", "Cast", [values], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{values.name}_Cast"
    )
    multiply = ir.Node("", "Mul", [cast.outputs[0], scale], name=f"{values.name}_Mul")
    cast.outputs[0].name = f"{values.name}_cast"
    expanded = multiply.outputs[0]
    expanded.name = f"{value.name}_expanded"
    for output in (cast.outputs[0], expanded):
        output.dtype = ir.DataType.FLOAT
        output.shape = ir.Shape(array.shape)
    tables = [use.node.name for use in value.uses() if _is_table_read(use.node, use.idx)]
    _read_instead(value, expanded)
    graph.insert_before(graph.node(0), [cast, multiply])
    return _Stored(value, expanded, values, readers, tables)


def _read_instead(value: ir.Value, replacement: ir.Value) -> None:
    for use in list(value.uses()):
        use.node.replace_input_with(use.idx, replacement)


def _unfolded(model: ir.Model, weights: list[_Stored]) -> dict[str, str]:
    """Give back the float constant wherever onnxruntime's graph still casts the 8-bit one (it
    would expand it on every run); node name -> why, for those."""
    cast = {n.input[0] for n in optimized_graph(model).node if n.op_type == "Cast"}
    declined = {}
    for stored in weights:
        if stored.quantized.name not in cast:
            continue
        _read_instead(stored.expanded, stored.original)
        for name in stored.readers:
            declined[name] = "onnxruntime would expand its 8-bit weight on every run"
            logger.info("'%s': its 8-bit weight is not folded at load; float kept", name)
        stored.readers.clear()
        stored.tables.clear()
    return declined


def _stored_bytes(stored: _Stored) -> int:
    scale = stored.expanded.producer().inputs[1].const_value
    return stored.quantized.const_value.size + 4 * scale.size


BUILDERS: dict[str, PassBuilder] = {
    "store-float-weights": lambda ctx: (
        None
        if ctx.options.quantization is None or not ctx.options.quantization.stored_weights
        else StoredWeightsPass(ctx.options.quantization.stored_weights, ctx.target)
    ),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
