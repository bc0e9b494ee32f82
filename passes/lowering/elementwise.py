"""Elementwise, pooling and Softmax ops in Q/DQ form lowered to onnxruntime's ``QLinear*`` ops.

A group ``y_q = Q(op(DQ(a), DQ(b), ...), s_y, z_y)`` becomes one com.microsoft op that reads the
integers, scales and zero points of its inputs and output and writes ``y_q`` itself. Each
computes ``Q(op(DQ(a), ...))`` with its own rounding:

- ``QLinearSigmoid``, ``QLinearLeakyRelu`` and ``QLinearConcat`` look ``y_q`` up in a table of
  ``Q(f(DQ(x)))`` for the 256 values of ``x``, built in float32: exact per input value but for
  ``f``'s own float rounding (Concat's ``f`` is the identity, a copy when the scales and zero
  points agree).
- ``QLinearAdd`` and ``QLinearMul`` compute ``(a - z_a) s_a / s_y`` ``+`` or ``*`` the same of
  ``b`` in float32 and round to ``y_q``.
- ``QLinearGlobalAveragePool`` sums the integers exactly and scales the sum by
  ``s_x / (s_y n)``; ``QLinearAveragePool`` dequantizes, averages in float32 and quantizes.
- ``QLinearSoftmax`` looks ``exp(s_x (x - max x))`` up in a uint32 table and writes
  ``round(e_i floor(1 / s_y) / sum e) + z_y``: ``floor(1 / s_y)`` in place of ``1 / s_y`` moves
  the result by less than one step, since a probability is at most 1.

So the lowered output is the Q/DQ group's within one quantization step. The kernels take one
8-bit type for all their integer inputs and output and float32 scales, one per tensor.

What onnxruntime 1.31's CPU provider runs, verified with uint8 (x86 targets) and int8 (arm64)
activations: all eight ops with both types, each within one step of the Q/DQ group (its int8
``QLinearSoftmax`` saturates at 127, though older sources of it cast without saturating).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    MatchResult,
    TargetRule,
    fail,
    model_opset,
    not_a_candidate,
)
from qgraph.passes.lowering.groups import (
    QuantizedOperand,
    dequantized,
    eight_bit_problem,
    quantize_operands,
)

Attributes = Callable[[ir.Node, int], dict[str, Any]]
"""The QLinear op's attributes, from the float op and the model's ai.onnx opset."""
Problem = Callable[[ir.Node], str | None]
"""Why the float op cannot become the QLinear op, beyond its operands (None if it can)."""


def _no_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    return {}


def _no_problem(node: ir.Node) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Row:
    """One lowering: the float op, onnxruntime's QLinear op for it, and how they differ.

    ``binary``: the op is Add or Mul (onnxscript tries both orders of their two inputs).
    ``output_first``: the QLinear op takes ``s_y, z_y`` before its inputs (Concat), not after.
    """

    name: str
    op_type: str
    qlinear: str
    attributes: Attributes = _no_attributes
    problem: Problem = _no_problem
    binary: bool = False
    output_first: bool = False

    @property
    def summary(self) -> str:
        return f"Q({self.op_type}(DQ(x), ...)) -> {self.qlinear}"


class QLinearLowering(TargetRule):
    """``Q(op(DQ(x), ...))`` -> ``com.microsoft.QLinear<op>``; which op is ``row``'s."""

    root_ops = frozenset({"QuantizeLinear"})
    row: Row

    def pattern(self, op, x, scale):
        result = getattr(op, self.row.op_type)(
            x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
        )
        return op.QuantizeLinear(result, scale, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, y, out, **_) -> MatchResult:
        node = y.producer()
        inputs = [dequantized(value) for value in node.inputs]
        if all(operand is None for operand in inputs):
            return not_a_candidate()
        self._node, self._inputs = node, inputs
        self._output = quantize_operands(out.producer())
        problem = self._operand_problem() or self.row.problem(node)
        if problem:
            return fail(problem, node)
        self._attributes = self.row.attributes(node, model_opset(context))
        return MatchResult()

    def _operand_problem(self) -> str | None:
        """Why the inputs and output are not 8-bit, per-tensor and of one type."""
        output = self._output
        for value, operand in zip(self._node.inputs, self._inputs, strict=True):
            if operand is None:
                return f"its input '{value.name}' is float, not behind a DequantizeLinear"
            problem = _kernel_operand_problem(operand, f"input '{value.name}'")
            if problem is None and operand.dtype != output.dtype:
                problem = (
                    f"its input '{value.name}' is {operand.dtype} and its output "
                    f"{output.dtype}; {self.row.qlinear} takes one 8-bit type"
                )
            if problem:
                return problem
        return _kernel_operand_problem(output, "output")

    def rewrite(self, op, out, **_):
        inputs = [value for operand in self._inputs for value in _triple(op, operand)]
        output = _triple(op, self._output)[1:]
        ordered = [*output, *inputs] if self.row.output_first else [*inputs, *output]
        return getattr(op, self.row.qlinear)(*ordered, _domain=MICROSOFT_DOMAIN, **self._attributes)


class QLinearBinaryLowering(QLinearLowering):
    """``Q(op(DQ(a), DQ(b)))`` -> ``com.microsoft.QLinear<op>`` for Add and Mul."""

    def pattern(self, op, a, b, scale):
        result = getattr(op, self.row.op_type)(a, b, _outputs=["y"])
        return op.QuantizeLinear(result, scale, _allow_other_inputs=True, _outputs=["out"])


def _kernel_operand_problem(operand: QuantizedOperand, role: str) -> str | None:
    """Why ``operand`` is not what the QLinear kernels read: 8-bit, one float32 scale."""
    problem = eight_bit_problem(operand, role)
    if problem is None and operand.scale.dtype != ir.DataType.FLOAT:
        return f"its {role} scale is {operand.scale.dtype}; the QLinear kernels take FLOAT"
    return problem


def _triple(op, operand: QuantizedOperand) -> list[ir.Value]:
    """(integers, scale, zero point): an absent zero point is spelled out as a scalar 0, since
    some kernels need one."""
    zero_point = operand.zero_point
    if zero_point is None:
        zero_point = op.Constant(value=ir.tensor(np.zeros((), operand.dtype.numpy())))
    return [operand.values, operand.scale, zero_point]


def _leaky_relu_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    return {"alpha": node.attributes.get_float("alpha", 0.01)}


def _concat_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    return {"axis": node.attributes.get_int("axis")}


def _global_average_pool_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    return {"channels_last": 0}


def _average_pool_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    return {name: attr for name, attr in node.attributes.items() if name != "dilations"}


def _average_pool_problem(node: ir.Node) -> str | None:
    dilations = node.attributes.get_ints("dilations", ())
    if any(d != 1 for d in dilations):
        return f"its dilations are {list(dilations)}; QLinearAveragePool has none"
    return None


SOFTMAX_AXIS_DEFAULT_CHANGED = 13
"""Softmax's default axis was 1 (flattening what follows) before opset 13, -1 from it on."""


def _softmax_attributes(node: ir.Node, opset: int) -> dict[str, Any]:
    default = 1 if opset < SOFTMAX_AXIS_DEFAULT_CHANGED else -1
    return {"axis": node.attributes.get_int("axis", default), "opset": opset}


ROWS = (
    Row("qlinear-add", "Add", "QLinearAdd", binary=True),
    Row("qlinear-mul", "Mul", "QLinearMul", binary=True),
    Row("qlinear-sigmoid", "Sigmoid", "QLinearSigmoid"),
    Row("qlinear-leaky-relu", "LeakyRelu", "QLinearLeakyRelu", _leaky_relu_attributes),
    Row("qlinear-concat", "Concat", "QLinearConcat", _concat_attributes, output_first=True),
    Row(
        "qlinear-global-average-pool",
        "GlobalAveragePool",
        "QLinearGlobalAveragePool",
        _global_average_pool_attributes,
    ),
    Row(
        "qlinear-average-pool",
        "AveragePool",
        "QLinearAveragePool",
        _average_pool_attributes,
        _average_pool_problem,
    ),
    Row("qlinear-softmax", "Softmax", "QLinearSoftmax", _softmax_attributes),
)


def rule_class(row: Row) -> type[QLinearLowering]:
    """The rule class that lowers ``row``'s op."""
    base = QLinearBinaryLowering if row.binary else QLinearLowering
    return type(f"{row.qlinear}Lowering", (base,), {"row": row})


TABLE = tuple((row.name, row.summary, (rule_class(row),)) for row in ROWS)
"""(name, summary, rule classes) per row, as the lower pass's ``RULES`` lists them."""
