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

from qgraph.kernels import optimized_graph
from qgraph.passes.annotate import WEIGHT_LAYOUTS
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.spec import QuantSpec, quantize_weight
from qgraph.sections import format_bytes
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

    def summary(self) -> str:
        if not self.stored:
            return f"no float op's weight stored in 8 bits{self._declined()}"
        folded = (
            "onnxruntime expands them once, at load (checked)"
            if self.checked
            else "expanded by constant folding at load (not checked on this host)"
        )
        return (
            f"the weights of {len(self.stored)} float ops stored in 8 bits "
            f"({format_bytes(self.float_bytes)} -> {format_bytes(self.stored_bytes)}): "
            f"{folded}{self._declined()}"
        )

    def _declined(self) -> str:
        if not self.declined:
            return ""
        name, why = next(iter(self.declined.items()))
        return f"; {len(self.declined)} declined (e.g. '{name}': {why})"


@dataclasses.dataclass
class _Stored:
    """One weight stored in 8 bits: its float tensor, its expansion, the ops reading it."""

    original: ir.Value
    expanded: ir.Value
    quantized: ir.Value
    readers: list[ir.Node]


class StoredWeightsPass(ir.passes.InPlacePass):
    """Store in 8 bits the weights of the named float ops (module docstring)."""

    def __init__(self, nodes: tuple[str, ...], target: TargetSpec) -> None:
        super().__init__()
        self.nodes = nodes
        self.target = target

    def call(self, model: ir.Model) -> ReportingPassResult:
        graph = model.graph
        by_name = {node.name: node for node in graph}
        declined: dict[str, str] = {}
        weights: dict[str, _Stored] = {}
        for name in self.nodes:
            node = by_name.get(name)
            problem = _problem(node, set(self.nodes)) if node is not None else "not in the graph"
            if problem is not None:
                declined[name] = problem
                continue
            index = WEIGHT_LAYOUTS[node.op_type].weight
            value = node.inputs[index]
            if value.name not in weights:
                weights[value.name] = _store(graph, node, value)
            weights[value.name].readers.append(node)
            node.replace_input_with(index, weights[value.name].expanded)
        checked = self._can_ask_runtime() and bool(weights)
        if checked:
            declined.update(_unfolded(model, weights))
        stored = [w for w in weights.values() if w.readers]
        report = StoredWeightsReport(
            tuple(node.name for w in stored for node in w.readers),
            sum(4 * w.original.const_value.size for w in stored),
            sum(_stored_bytes(w) for w in stored),
            declined,
            checked,
        )
        return ReportingPassResult(model, bool(stored), report)

    def _can_ask_runtime(self) -> bool:
        return self.target.kernels.runtime_checked and same_arch(
            self.target.arch, platform.machine()
        )


def _problem(node: ir.Node, asked: set[str]) -> str | None:
    """Why ``node``'s weight cannot be stored in 8 bits, or None."""
    if node.op_type not in STORED_OPS or node.domain != "":
        return f"{node.op_type} has no output-channel axis qgraph stores by"
    value = node.inputs[WEIGHT_LAYOUTS[node.op_type].weight]
    if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
        return "its weight is not a float32 constant"
    if node.op_type != "Conv" and len(value.const_value.shape) != 2:
        return "its weight is not a matrix"
    others = [use.node.name for use in value.uses() if use.node.name not in asked]
    if others:
        return f"'{others[0]}' reads the same weight in float"
    return None


def _store(graph: ir.Graph, node: ir.Node, value: ir.Value) -> _Stored:
    """``value`` as ``Mul(Cast(W_q), s)``, per output channel of ``node``, inserted before it."""
    array = value.const_value.numpy()
    axis = WEIGHT_LAYOUTS[node.op_type].channel_axis(node)
    quantized = quantize_weight(array, dataclasses.replace(STORAGE, axis=axis))
    shape = [1] * array.ndim
    shape[axis] = -1
    values = _initializer(graph, f"{value.name}_stored", quantized.values, ir.DataType.INT8)
    scale = _initializer(
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
    graph.insert_before(node, [cast, multiply])
    return _Stored(value, expanded, values, [])


def _initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    tensor = ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _unfolded(model: ir.Model, weights: dict[str, _Stored]) -> dict[str, str]:
    """Give back the float weight wherever onnxruntime's graph still casts the 8-bit one (it
    would expand it on every run); node name -> why, for those."""
    cast = {n.input[0] for n in optimized_graph(model).node if n.op_type == "Cast"}
    declined = {}
    for stored in weights.values():
        if stored.quantized.name not in cast:
            continue
        for reader in stored.readers:
            index = WEIGHT_LAYOUTS[reader.op_type].weight
            reader.replace_input_with(index, stored.original)
            declined[reader.name] = "onnxruntime would expand its 8-bit weight on every run"
            logger.info("'%s': its 8-bit weight is not folded at load; float kept", reader.name)
        stored.readers.clear()
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
