"""Where ``X diag(s)^-1`` goes: into the constants of what produces ``X``, or a new ``Mul``.

Dividing ``X`` by ``s`` along its channel axis commutes with every producer in
``PRODUCER_FOLDS``, so the division moves into that producer's constants:

- ``LayerNormalization``, ``SimplifiedLayerNormalization``, ``RMSNormalization`` over the last
  axis: ``gamma / s`` and ``beta / s``;
- ``MatMul(A, W)``: ``W[:, j] / s_j``; ``Gemm``: ``B``'s output channels and ``C``;
  ``Conv``: ``W[m] / s_m`` and ``B_m / s_m``;
- ``Mul(a, c)`` by a constant: ``c / s``; ``Mul(a, b)``: one factor divided (either that folds);
- ``Add(a, b)``: both terms divided (a constant term directly);
- ``Relu``, ``LeakyRelu``, ``MaxPool``: ``f(x) / s = f(x / s)`` for ``s > 0``: on to ``x``.

A constant is divided along its axis that broadcasts onto ``X``'s channel axis, which must hold
all the channels (a constant broadcast across channels cannot take a per-channel scale). The
fold needs every tensor on its path, ``X`` included, to have no other reader and not to be a
graph output; where it cannot go, ``insert_division`` puts ``Mul(X, 1 / s)`` before the readers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class Channels:
    """Where a tensor's channels are: ``count`` of them on ``axis`` of a rank-``rank`` tensor."""

    count: int
    axis: int
    rank: int

    def aligned(self, rank: int) -> int:
        """The axis of a rank-``rank`` operand that broadcasts onto the channel axis."""
        return self.axis - (self.rank - rank)


@dataclasses.dataclass(frozen=True)
class Rescale:
    """Constant input ``index`` of ``node`` is multiplied by ``s ** power`` along ``axis``."""

    node: ir.Node
    index: int
    axis: int
    power: int


Fold = list[Rescale] | str
"""The constants to divide, or why the division cannot be folded."""


def fold_plan(value: ir.Value, channels: Channels) -> Fold:
    """How to divide ``value`` (read only by ops that take ``diag(s)``) by ``s`` for free."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    producer = value.producer()
    if producer is None:
        return f"'{value.name}' is a graph input"
    fold = PRODUCER_FOLDS.get(producer.op_type) if producer.domain == "" else None
    if fold is None:
        return f"its producer {producer.op_type} '{producer.name}' does not commute with a scale"
    return fold(producer, channels)


def _operand(node: ir.Node, index: int, channels: Channels) -> Fold:
    """Fold the division into input ``index`` of ``node``, a producer on the path."""
    value = node.inputs[index]
    if value is None:
        return f"input {index} of '{node.name}' is missing"
    if value.const_value is not None:
        rank = len(value.const_value.shape)
        return _constant(node, index, channels.aligned(rank), channels)
    if len(value.uses()) != 1:
        return f"'{value.name}' on the way has other readers"
    if value.shape is None:
        return f"the shape of '{value.name}' is unknown"
    rank = len(value.shape)
    axis = channels.aligned(rank)
    if not 0 <= axis < rank or value.shape[axis] != channels.count:
        return f"'{value.name}' does not hold the {channels.count} channels on its own axis"
    return fold_plan(value, Channels(channels.count, axis, rank))


def _constant(node: ir.Node, index: int, axis: int, channels: Channels) -> Fold:
    """Input ``index`` of ``node``: a float32 constant whose ``axis`` holds the channels."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None or value.is_graph_input():
        return f"input {index} of {node.op_type} '{node.name}' is not a constant"
    if value.const_value.dtype != ir.DataType.FLOAT:
        return f"constant '{value.name}' is not float32"
    shape = value.const_value.shape
    if not 0 <= axis < len(shape) or shape[axis] != channels.count:
        return f"constant '{value.name}' of shape {list(shape)} broadcasts across the channels"
    return [Rescale(node, index, axis, -1)]


def _combined(*folds: Fold) -> Fold:
    """All of ``folds`` together, or the first reason one of them cannot."""
    plan: list[Rescale] = []
    for fold in folds:
        if isinstance(fold, str):
            return fold
        plan.extend(fold)
    return plan


def _optional(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def _normalization(node: ir.Node, channels: Channels) -> Fold:
    if channels.axis != channels.rank - 1:
        return f"{node.op_type} '{node.name}' scales the last axis, not the channels' axis"
    if node.attributes.get_int("axis", -1) not in (-1, channels.rank - 1):
        return f"{node.op_type} '{node.name}' does not normalize the last axis"
    folds = [_constant(node, i, 0, channels) for i in (1, 2) if _optional(node, i)]
    return _combined(*folds)


def _matmul(node: ir.Node, channels: Channels) -> Fold:
    if channels.axis != channels.rank - 1:
        return f"MatMul '{node.name}' writes its channels on the last axis"
    if node.inputs[0].const_value is not None:
        return f"MatMul '{node.name}' has a constant first input"
    return _constant(node, 1, 1, channels)


def _gemm(node: ir.Node, channels: Channels) -> Fold:
    transposed = node.attributes.get_int("transB", 0) == 1
    weight = _constant(node, 1, 0 if transposed else 1, channels)
    bias = _operand(node, 2, channels) if _optional(node, 2) else []
    return _combined(weight, bias)


def _conv(node: ir.Node, channels: Channels) -> Fold:
    if channels.axis != 1:
        return f"Conv '{node.name}' writes its channels on axis 1"
    bias = _constant(node, 2, 0, channels) if _optional(node, 2) else []
    return _combined(_constant(node, 1, 0, channels), bias)


def _mul(node: ir.Node, channels: Channels) -> Fold:
    first, second = node.inputs
    if first is second:
        return f"Mul '{node.name}' squares its input"
    reasons = []
    for index in (1, 0):
        fold = _operand(node, index, channels)
        if not isinstance(fold, str):
            return fold
        reasons.append(fold)
    return reasons[0]


def _add(node: ir.Node, channels: Channels) -> Fold:
    first, second = node.inputs
    if first is second:
        return f"Add '{node.name}' doubles its input"
    return _combined(_operand(node, 0, channels), _operand(node, 1, channels))


def _positively_homogeneous(node: ir.Node, channels: Channels) -> Fold:
    if node.op_type == "MaxPool" and (channels.axis != 1 or len(node.outputs) > 1):
        return f"MaxPool '{node.name}' keeps channels on axis 1 and returns no indices"
    return _operand(node, 0, channels)


PRODUCER_FOLDS: dict[str, Callable[[ir.Node, Channels], Fold]] = {
    "LayerNormalization": _normalization,
    "SimplifiedLayerNormalization": _normalization,
    "RMSNormalization": _normalization,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "Mul": _mul,
    "Add": _add,
    "Relu": _positively_homogeneous,
    "LeakyRelu": _positively_homogeneous,
    "MaxPool": _positively_homogeneous,
}
"""Producers that a per-channel division of their output passes into or through."""


def apply(rescale: Rescale, scale: np.ndarray) -> None:
    """Replace the constant ``rescale`` names by itself times ``scale ** power`` on its axis."""
    value = rescale.node.inputs[rescale.index]
    array = value.const_value.numpy()
    shape = [1] * array.ndim
    shape[rescale.axis] = -1
    factor = (scale.astype(np.float64) ** rescale.power).reshape(shape)
    replace_constant(rescale.node, rescale.index, (array * factor).astype(array.dtype))


def replace_constant(
    node: ir.Node, index: int, array: np.ndarray, suffix: str = "smoothed"
) -> None:
    """Give ``node`` a new initializer ``<old name>.<suffix>`` as input ``index``; the old one
    stays for its other readers (a weight tied elsewhere is not changed there)."""
    old = node.inputs[index]
    graph = node.graph
    base = f"{old.name}.{suffix}"
    name, number = base, 1
    while name in graph.initializers:
        name, number = f"{base}.{number}", number + 1
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), old.dtype
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def insert_division(
    value: ir.Value, readers: list[ir.Node], scale: np.ndarray, channels: Channels
) -> ir.Node:
    """``Mul(value, 1 / s)`` inserted after ``value``'s producer, read by ``readers``."""
    graph = readers[0].graph
    shape = [channels.count] + [1] * (channels.rank - 1 - channels.axis)
    name = f"{value.name}.smoothing"
    inverse = (1.0 / scale.astype(np.float64)).astype(np.float32).reshape(shape)
    divisor = ir.Value(name=name, const_value=ir.tensor(inverse, name=name))
    divisor.shape, divisor.dtype = ir.Shape(inverse.shape), ir.DataType.FLOAT
    graph.register_initializer(divisor)
    node = ir.node("Mul", [value, divisor], name=f"{value.name}/SmoothQuant/Mul")
    node.outputs[0].name = f"{value.name}.smoothed"
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    producer = value.producer()
    if producer is None:
        graph.insert_before(graph.node(0), node)
    else:
        graph.insert_after(producer, node)
    for reader in readers:
        reader.replace_input_with(0, node.outputs[0])
    return node
