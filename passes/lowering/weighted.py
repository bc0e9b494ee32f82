"""Weighted ops in Q/DQ form lowered to onnxruntime's integer kernels.

With an activation ``a = (a_q - z_a) s_a`` (one scale) and weights ``w = (w_q - z_w) s_w`` (one
scale per output channel), ``sum_k a_k w_k = s_a s_w sum_k (a_q - z_a)(w_q - z_w)``, and the
integer sum is exact in int32. So:

- ``MatMul(DQ(a), DQ(w))`` -> ``MatMulIntegerToFloat(a_q, w_q, s_a, s_w, z_a, z_w)``;
  ``s_a`` may be computed at run time (``DynamicQuantizeLinear``).
- ``Gemm(DQ(a), DQ(w)[, DQ(c_q)])`` -> ``QGemm`` with a float output; ``c_q`` is int32 at scale
  ``s_a s_w``, which QGemm adds to the integer sum; a float ``c`` (dynamic mode) is added after.
- ``Q(Conv(DQ(x), DQ(w)[, DQ(b_q)]), s_y, z_y)`` -> ``QLinearConv`` and ``Q(MatMul(DQ(a),
  DQ(w)), s_y, z_y)`` -> ``QLinearMatMul``: ``y_q = clamp(round((s_a s_w / s_y) (sum + b_q)) +
  z_y)``. A ``Relu`` between the op and the Q is dropped when ``z_y`` is the integer type's
  minimum, since the Q's clamp then is that Relu.
- ``Conv(DQ(x), DQ(w)[, b])`` with a float output -> ``ConvInteger(x_q, w_q, z_x, z_w)``, cast to
  float, times ``s_x s_w`` per output channel, plus ``b``.

Each gives the Q/DQ model's numbers up to float32 rounding of the final scaling; the ``QLinear``
ops can then land a value within that rounding of a step boundary one step away.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    MatchResult,
    TargetRule,
    constant,
    fail,
    not_a_candidate,
)
from qgraph.passes.lowering.groups import (
    QuantizedOperand,
    bias_problem,
    constant_or_dequantized,
    dequantized,
    eight_bit_problem,
    new_initializer,
    quantize_operands,
    quantized_weight_problem,
)

MATMUL_WEIGHT_AXIS = 1
"""A MatMul weight [K, N] has its output channels on axis 1; Conv and transB Gemm on axis 0."""


def _operands(node: ir.Node, channel_axis: int, rank: int):
    """(activation, weight, reason): the DQ operands of ``node``'s first two inputs."""
    activation = dequantized(node.inputs[0])
    weight = dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
    if activation is None:
        return None, None, "its activation is not dequantized"
    problem = eight_bit_problem(activation, "activation") or quantized_weight_problem(
        weight, channel_axis, rank
    )
    return activation, weight, problem


def _bias(node: ir.Node, activation: QuantizedOperand, weight: QuantizedOperand):
    """(int32 bias values or None, reason): the third input as an integer kernel takes it."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None, None
    bias = dequantized(node.inputs[2])
    if bias is None:
        return None, f"its bias '{node.inputs[2].name}' is float, not int32 behind a DQ"
    return bias.values, bias_problem(bias, activation.scale, weight.scale)


def _float_bias(node: ir.Node) -> ir.Value | None:
    """The third input when it is float (dynamic mode keeps biases float), else None."""
    if len(node.inputs) < 3 or node.inputs[2] is None or dequantized(node.inputs[2]):
        return None
    return node.inputs[2]


class MatMulToMatMulIntegerToFloat(TargetRule):
    """``MatMul(DQ(a), DQ(w))`` -> ``com.microsoft.MatMulIntegerToFloat``."""

    root_ops = frozenset({"MatMul"})

    def pattern(self, op, a, w):
        return op.MatMul(a, w, _outputs=["out"])

    def check(self, context, a, w, out, **_) -> MatchResult:
        if dequantized(a) is None and dequantized(w) is None:
            return not_a_candidate()
        self._a, self._w, problem = _operands(out.producer(), MATMUL_WEIGHT_AXIS, rank=2)
        return fail(problem, out.producer()) if problem else MatchResult()

    def rewrite(self, op, a, w, out, **_):
        a_, w_ = self._a, self._w
        return op.MatMulIntegerToFloat(
            a_.values,
            w_.values,
            a_.scale,
            w_.scale,
            a_.zero_point,
            w_.zero_point,
            _domain=MICROSOFT_DOMAIN,
        )


class GemmToQGemm(TargetRule):
    """``Gemm(DQ(a), DQ(w)[, DQ(c_q)])`` -> ``com.microsoft.QGemm`` with a float output."""

    root_ops = frozenset({"Gemm"})

    def pattern(self, op, a, w):
        return op.Gemm(a, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, a, w, out, **_) -> MatchResult:
        gemm = out.producer()
        if dequantized(a) is None and dequantized(w) is None:
            return not_a_candidate()
        channel_axis = 0 if gemm.attributes.get_int("transB", 0) else 1
        self._a, self._w, problem = _operands(gemm, channel_axis, rank=2)
        self._float_c = _float_bias(gemm)
        self._c = None
        if problem is None and self._float_c is None:
            self._c, problem = _bias(gemm, self._a, self._w)
        if problem is None and gemm.attributes.get_float("beta", 1.0) != 1.0:
            problem = "beta is not 1"
        self._gemm = gemm
        return fail(problem, gemm) if problem else MatchResult()

    def rewrite(self, op, a, w, out, **_):
        a_, w_ = self._a, self._w
        attributes = {k: v for k, v in self._gemm.attributes.items() if k != "beta"}
        product = op.QGemm(
            a_.values,
            a_.scale,
            a_.zero_point,
            w_.values,
            w_.scale,
            w_.zero_point,
            self._c,
            _domain=MICROSOFT_DOMAIN,
            **attributes,
        )
        return product if self._float_c is None else op.Add(product, self._float_c)


class QuantizedOutputRule(TargetRule):
    """``Q([Relu](op(DQ(a), DQ(w)[, DQ(b)])))`` -> one op with a quantized output."""

    root_ops = frozenset({"QuantizeLinear"})
    op_type = ""
    through_relu = False

    def pattern(self, op, a, w, scale):
        product = getattr(op, self.op_type)(
            a, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
        )
        if self.through_relu:
            product = op.Relu(product)
        return op.QuantizeLinear(product, scale, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, a, w, scale, y, out, **_) -> MatchResult:
        if dequantized(a) is None and dequantized(w) is None:
            return not_a_candidate()
        node = y.producer()
        self._node, self._output = node, quantize_operands(out.producer())
        self._a, self._w, problem = _operands(node, self.channel_axis, _rank(w))
        if problem is None:
            problem = eight_bit_problem(self._output, "output") or self._relu_problem()
        if problem is None:
            self._bias, problem = _bias(node, self._a, self._w)
        return fail(problem, node) if problem else MatchResult()

    def _relu_problem(self) -> str | None:
        """A Relu before the Q is the Q's own clamp only when its zero point is the minimum."""
        if not self.through_relu:
            return None
        zero_point = self._output.zero_point_array()
        if zero_point is None or np.any(zero_point != self._output.dtype.min):
            return "a Relu sits between it and the Q, whose zero point is not the minimum"
        return None

    def quantized_inputs(self) -> list[ir.Value | None]:
        """The QLinear op's inputs: a, its scale and zero point, w and its, y's scale and
        zero point."""
        a_, w_, o = self._a, self._w, self._output
        return [
            a_.values,
            a_.scale,
            a_.zero_point,
            w_.values,
            w_.scale,
            w_.zero_point,
            o.scale,
            o.zero_point,
        ]


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else 0


class QLinearConvLowering(QuantizedOutputRule):
    """``Q(Conv(DQ(x), DQ(w)[, DQ(b_q)]))`` -> ``QLinearConv``."""

    op_type = "Conv"
    channel_axis = 0

    def rewrite(self, op, a, w, scale, y, out, **_):
        return op.QLinearConv(*self.quantized_inputs(), self._bias, **self._node.attributes)


class QLinearConvReluLowering(QLinearConvLowering):
    """``Q(Relu(Conv(DQ(x), DQ(w)[, DQ(b_q)])))`` -> ``QLinearConv``."""

    through_relu = True


class QLinearMatMulLowering(QuantizedOutputRule):
    """``Q(MatMul(DQ(a), DQ(w)))`` -> ``QLinearMatMul``."""

    op_type = "MatMul"
    channel_axis = MATMUL_WEIGHT_AXIS

    def rewrite(self, op, a, w, scale, y, out, **_):
        return op.QLinearMatMul(*self.quantized_inputs())


class QLinearMatMulReluLowering(QLinearMatMulLowering):
    """``Q(Relu(MatMul(DQ(a), DQ(w))))`` -> ``QLinearMatMul``."""

    through_relu = True


class ConvToConvInteger(TargetRule):
    """``Conv(DQ(x), DQ(w)[, b])`` with a float output -> ``ConvInteger``, scaled."""

    root_ops = frozenset({"Conv"})

    def pattern(self, op, x, w):
        return op.Conv(x, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, w, out, **_) -> MatchResult:
        conv = out.producer()
        if dequantized(x) is None and dequantized(w) is None:
            return not_a_candidate()
        self._x, self._w, problem = _operands(conv, 0, _rank(w))
        if problem is None and self._x.dtype != ir.DataType.UINT8:
            problem = "onnxruntime's ConvInteger reads uint8 activations only"
        if problem is None:
            problem = self._zero_point_problem()
        if problem is None and len(conv.inputs) > 2 and conv.inputs[2] is not None:
            problem = self._bias_problem(conv.inputs[2])
        self._conv = conv
        return fail(problem, conv) if problem else MatchResult()

    def _zero_point_problem(self) -> str | None:
        """onnxruntime's ConvInteger takes one weight zero point: per-channel ones must agree."""
        zero_point = self._w.zero_point_array()
        if zero_point is None or np.unique(zero_point).size > 1:
            return "its weight zero points differ by channel; ConvInteger takes one"
        self._w_zero_point = zero_point.reshape(-1)[:1].reshape(()).astype(self._w.dtype.numpy())
        return None

    def _bias_problem(self, bias: ir.Value) -> str | None:
        self._bias_array = constant_or_dequantized(bias)
        return None if self._bias_array is not None else f"its bias '{bias.name}' is not a constant"

    def rewrite(self, op, x, w, out, **_):
        x_, w_, conv = self._x, self._w, self._conv
        attributes = dict(conv.attributes)
        w_zero_point = new_initializer(op, conv, "weight_zero_point", self._w_zero_point)
        sums = op.ConvInteger(x_.values, w_.values, x_.zero_point, w_zero_point, **attributes)
        channel_shape = [-1] + [1] * (len(w.shape) - 2)
        weight_scale = constant(w_.scale).astype(np.float32).reshape(-1)
        weight_scale = np.broadcast_to(weight_scale, (w.shape[0],)).reshape(channel_shape)
        scale = op.Mul(x_.scale, new_initializer(op, conv, "weight_scale", weight_scale))
        result = op.Mul(op.Cast(sums, to=ir.DataType.FLOAT), scale)
        if len(conv.inputs) < 3 or conv.inputs[2] is None:
            return result
        bias = self._bias_array.astype(np.float32).reshape(channel_shape)
        return op.Add(result, new_initializer(op, conv, "bias", bias))
