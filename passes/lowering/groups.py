"""What lowering rules read off a Q/DQ group: the operands of its Q and DQ nodes.

``DequantizeLinear(q, s, z)`` computes ``(q - z) * s`` in float32; ``QuantizeLinear(x, s, z)``
computes ``clamp(round_half_even(x / s) + z)``. A rule replaces a group of them and a float op
with an integer op that takes the same ``q``, ``s`` and ``z`` as inputs, so it only has to know
those operands, where the scale varies (``axis``), and whether it varies in blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN, ONNX_DOMAINS
from qgraph.passes.fusion.rules import constant

EIGHT_BIT = frozenset({ir.DataType.UINT8, ir.DataType.INT8})
FOUR_BIT = frozenset({ir.DataType.UINT4, ir.DataType.INT4})
INT32 = ir.DataType.INT32


@dataclasses.dataclass(frozen=True)
class QuantizedOperand:
    """The integer tensor ``values`` of one Q or DQ node (a DQ's input, a Q's output), its
    ``scale`` and ``zero_point``, and its attributes."""

    values: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    axis: int
    block_size: int

    @classmethod
    def of(cls, node: ir.Node) -> QuantizedOperand:
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        quantized = node.outputs[0] if node.op_type == "QuantizeLinear" else inputs[0]
        return cls(
            values=quantized,
            scale=inputs[1],
            zero_point=inputs[2],
            axis=node.attributes.get_int("axis", 1),
            block_size=node.attributes.get_int("block_size", 0),
        )

    @property
    def dtype(self) -> ir.DataType | None:
        return self.values.dtype

    def per_tensor(self) -> bool:
        """One scale for the whole tensor."""
        shape = self.scale.shape
        return shape is not None and shape.is_static() and int(np.prod(shape.numpy())) == 1

    def per_axis(self, axis: int, rank: int) -> bool:
        """One scale per index of ``axis`` (no blocks) of a tensor of ``rank``."""
        shape = self.scale.shape
        return (
            self.block_size == 0
            and shape is not None
            and len(shape) == 1
            and self.axis % rank == axis % rank
        )

    def zero_point_array(self) -> np.ndarray | None:
        """The zero point as an array (zeros when it is absent), or None if not constant."""
        if self.zero_point is None:
            return np.zeros(())
        return constant(self.zero_point)


def dequantized(value: ir.Value | None) -> QuantizedOperand | None:
    """The operands of the DequantizeLinear that produces ``value``, or None."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    if producer.domain not in (*ONNX_DOMAINS, MICROSOFT_DOMAIN):
        return None
    return QuantizedOperand.of(producer)


def quantize_operands(node: ir.Node) -> QuantizedOperand | None:
    """The operands of ``node`` if it is a QuantizeLinear, else None."""
    if node.op_type != "QuantizeLinear" or node.domain not in (*ONNX_DOMAINS, MICROSOFT_DOMAIN):
        return None
    return QuantizedOperand.of(node)


def eight_bit_problem(operand: QuantizedOperand, role: str) -> str | None:
    """Why ``operand`` is not a per-tensor 8-bit activation an integer kernel reads."""
    if operand.dtype not in EIGHT_BIT:
        return f"its {role} is {operand.dtype}, not 8-bit"
    if not operand.per_tensor():
        return f"its {role} has more than one scale"
    return None


def quantized_weight_problem(
    weight: QuantizedOperand | None, channel_axis: int, rank: int
) -> str | None:
    """Why ``weight`` is not a constant 8-bit tensor with one scale, or one per channel."""
    if weight is None:
        return "its weight is not dequantized"
    if weight.dtype not in EIGHT_BIT:
        return f"its weight is {weight.dtype}, not 8-bit"
    values = constant(weight.values)
    if values is None or values.ndim != rank:
        return f"its weight is not a constant of rank {rank}"
    if not (weight.per_tensor() or weight.per_axis(channel_axis, rank)):
        return f"its weight scales are neither one nor one per channel (axis {channel_axis})"
    return None


def dequantized_constant(operand: QuantizedOperand) -> np.ndarray | None:
    """``(q - z) * s`` of a constant per-tensor or 1-D operand, in float32 like the DQ."""
    values, scale = constant(operand.values), constant(operand.scale)
    zero_point = operand.zero_point_array()
    if values is None or scale is None or zero_point is None:
        return None
    return ((values.astype(np.int64) - zero_point).astype(np.float32) * scale).astype(np.float32)


def constant_or_dequantized(value: ir.Value) -> np.ndarray | None:
    """The array of a constant, or of a ``DequantizeLinear`` of one (float32), else None."""
    operand = dequantized(value)
    return constant(value) if operand is None else dequantized_constant(operand)


def bias_problem(
    bias: QuantizedOperand, input_scale: ir.Value, weight_scale: ir.Value
) -> str | None:
    """Why ``bias`` is not an int32 tensor at scale ``s_x * s_w`` with zero point 0, the form
    integer kernels add to their accumulator."""
    if bias.dtype != INT32:
        return f"its bias '{bias.values.name}' is {bias.dtype}, not int32"
    scales = [constant(v) for v in (bias.scale, input_scale, weight_scale)]
    zero_point = bias.zero_point_array()
    if any(s is None for s in scales) or zero_point is None:
        return "its bias scale or zero point is not a constant"
    bias_scale, input_s, weight_s = scales
    product = np.float32(input_s.reshape(())) * weight_s.astype(np.float32)
    try:
        product = np.broadcast_to(product, bias_scale.shape)
    except ValueError:
        return "its bias scale has another shape than s_x * s_w"
    if not np.array_equal(product, bias_scale):
        return "its bias scale is not s_x * s_w"
    if np.any(zero_point != 0):
        return "its bias zero point is not 0"
    return None


def new_initializer(op, node: ir.Node, suffix: str, array: np.ndarray) -> ir.Value:
    """An initializer named ``<node>_<suffix>``, unique in ``node``'s graph, made by ``op``."""
    taken = node.graph.initializers if node.graph is not None else {}
    base = f"{node.name}_{suffix}"
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return op.initializer(ir.tensor(np.array(array, order="C"), name=name), name=name)  # keeps 0-d
