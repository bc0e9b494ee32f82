"""16-bit activations on a runtime without 16-bit kernels: two 8-bit digits.

An op reading a 16-bit activation ``DQ(Q(x, s, z))`` (``q = clamp(round(x / s) + z)``, the
16-bit value ``s (q - z)``) and an 8-bit weight ``w = s_w (w_q - z_w)`` (one scale per output
channel) has no integer kernel in onnxruntime: it would run in float, its weight dequantized
on every run. Its u8 x s8 product with a float output, ``MatMulIntegerToFloat``, is exact in
int32, so the activation is written as two unsigned 8-bit digits, high ``h`` and low ``l``:

    h = clamp(round(x / (257 s)) + z_h),      z_h = round(z_u / 257)
    r = x - 257 s (h - z_h)                    what the high digit misses
    l = clamp(round(r / s) + 128)
    x ~ 257 s (h - z_h) + s (l - 128)

(``z_u`` is ``z`` as an unsigned 16-bit zero point: ``z + 32768`` for int16.) Over the 16-bit
range, ``x / s`` in ``[-z_u, 65535 - z_u]``, ``x / (257 s) + z_h`` stays inside
``(-0.5, 255.5)`` (``65535 = 255 * 257``, and ``|z_h - z_u / 257| < 1/2`` since 257 is odd),
so ``h`` is never clamped there and ``|r| <= 128.5 s``. As ``257 (h - z_h)`` is an integer,
the two digits give ``s round(x / s)``, the 16-bit value itself, except where
``round(r / s) = 128`` clamps to 127: within one step ``s`` everywhere in the range. Beyond
it both clamp, the digits up to 128 steps further out than the 16-bit value. A weighted op
is linear in its activation, so

    op(x, w) = 257 s s_w op(h - z_h, w_q - z_w) + s s_w op(l - 128, w_q - z_w) + b

two integer products summed in float (the bias rides on the first). A MatMul or Gemm reads
the digits directly; a 2-D Conv (one group) reads them as im2col rows: the input taken
channels-last (the tensor behind an exporter's NHWC -> NCHW Transpose, else transposed), each
digit padded with its own zero point (the digit form of 0), and the ``kh kw`` taps gathered
(one Gather of flat positions where the height and width are known, else sliced, start ``i d``
and stride ``st``, and concatenated), so that row ``(n, y, x)`` holds
``x_{c, y st + i d, x st + j d}`` at column ``(i kw + j) C + c`` and the weight reshaped to
``[kh kw C, O]`` multiplies it; the ``[N, Ho, Wo, O]`` sum is moved back to ``[N, O, Ho, Wo]``.

Each digit product costs one 8-bit product, so a 16-bit op costs about two 8-bit ones plus
the digits' elementwise work: where 8-bit products run 3-10x fp32 (VNNI) that beats float;
where they run 1-2x (AVX2), rarely. The accuracy plan times both (``qgraph.timing``) before
it asks for 16 bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import MatchResult, TargetRule, constant, fail, not_a_candidate
from qgraph.passes.lowering.groups import (
    QuantizedOperand,
    constant_or_dequantized,
    dequantized,
    new_initializer,
    quantize_operands,
    quantized_weight_problem,
)

SIXTEEN_BIT = frozenset({ir.DataType.UINT16, ir.DataType.INT16})
HIGH_STEPS = 257
"""Low-digit steps per high-digit step: 256 high levels then span 65535 + 257 steps."""
LOW_ZERO_POINT = 128


@dataclasses.dataclass(frozen=True)
class SixteenBitInput:
    """The float tensor behind a 16-bit ``DQ(Q(x, s, z))``, its scale and unsigned zero point."""

    source: ir.Value
    scale: float
    zero_point: int

    @property
    def high_scale(self) -> np.float32:
        return np.float32(HIGH_STEPS * np.float32(self.scale))

    @property
    def high_zero_point(self) -> np.uint8:
        return np.uint8(min(max(round(self.zero_point / HIGH_STEPS), 0), 255))


@dataclasses.dataclass(frozen=True)
class Digit:
    """One 8-bit digit of the activation: its values, scale and zero point."""

    values: ir.Value
    scale: ir.Value
    zero_point: ir.Value


def sixteen_bit_input(value: ir.Value) -> SixteenBitInput | None:
    """``value`` as a 16-bit ``DQ(Q(x, s, z))`` with one scale, or None."""
    dq = dequantized(value)
    if dq is None or _stored_type(dq) not in SIXTEEN_BIT or not dq.per_tensor():
        return None
    producer = dq.values.producer()
    q = quantize_operands(producer) if producer is not None else None
    scale, zero_point = constant(dq.scale), dq.zero_point_array()
    if q is None or scale is None or zero_point is None:
        return None
    if not (_same(q.scale, dq.scale) and _same(q.zero_point, dq.zero_point)):
        return None
    unsigned = int(zero_point.reshape(-1)[0]) + (32768 if _stored_type(dq).is_signed() else 0)
    return SixteenBitInput(producer.inputs[0], float(scale.reshape(-1)[0]), unsigned)


def _stored_type(dq: QuantizedOperand) -> ir.DataType | None:
    """The integer type a DQ reads: its input's, or its zero point's before types are known."""
    if dq.dtype is not None or dq.zero_point is None:
        return dq.dtype
    return dq.zero_point.dtype


def _same(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None:
        return a is b
    left, right = constant(a), constant(b)
    return left is not None and right is not None and np.array_equal(left, right)


def digits(op, node: ir.Node, found: SixteenBitInput) -> tuple[Digit, Digit]:
    """The high and low digits of ``found``'s float tensor (module docstring)."""
    high_scale = new_initializer(op, node, "high_scale", found.high_scale)
    high_zero = new_initializer(op, node, "high_zero_point", found.high_zero_point)
    low_scale = new_initializer(op, node, "low_scale", np.float32(found.scale))
    low_zero = new_initializer(op, node, "low_zero_point", np.uint8(LOW_ZERO_POINT))
    high = op.QuantizeLinear(found.source, high_scale, high_zero)
    missed = op.Sub(found.source, op.DequantizeLinear(high, high_scale, high_zero))
    low = op.QuantizeLinear(missed, low_scale, low_zero)
    return Digit(high, high_scale, high_zero), Digit(low, low_scale, low_zero)


def digit_products(
    op, pair: tuple[Digit, Digit], weight: QuantizedOperand, weight_values: ir.Value, bias
) -> ir.Value:
    """``sum_d MatMulIntegerToFloat(d, w_q)`` over the two digits, ``bias`` on the first."""
    products = [
        op.MatMulIntegerToFloat(
            digit.values,
            weight_values,
            digit.scale,
            weight.scale,
            digit.zero_point,
            weight.zero_point,
            *([bias] if bias is not None and index == 0 else []),
            _domain=MICROSOFT_DOMAIN,
        )
        for index, digit in enumerate(pair)
    ]
    return op.Add(*products)


def float_bias(node: ir.Node, index: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """(the bias input as ``channels`` float32 values, or None; why it cannot be one)."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None, None
    value = node.inputs[index]
    array = constant_or_dequantized(value)
    if array is None:
        return None, f"its bias '{value.name}' is not a constant"
    if array.size not in (1, channels):
        return None, f"its bias '{value.name}' is not one value per output channel"
    return np.broadcast_to(array.astype(np.float32).reshape(-1), (channels,)).copy(), None


class _DigitRule(TargetRule):
    """Shared checks: a 16-bit activation on input 0 and an 8-bit constant weight on input 1."""

    def _operands(self, node: ir.Node, channel_axis: int, rank: int) -> str | None:
        self._node = node
        self._input = sixteen_bit_input(node.inputs[0])
        self._weight = dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
        if self._input is None:
            return ""
        return quantized_weight_problem(self._weight, channel_axis, rank)

    def _result(self, problem: str | None) -> MatchResult:
        if problem == "":
            return not_a_candidate()
        return fail(problem, self._node) if problem else MatchResult()


class DigitMatMul(_DigitRule):
    """``MatMul(DQ16(a), DQ(w))`` -> two ``MatMulIntegerToFloat`` over the digits of ``a``."""

    root_ops = frozenset({"MatMul"})

    def pattern(self, op, a, w):
        return op.MatMul(a, w, _outputs=["out"])

    def check(self, context, a, w, out, **_) -> MatchResult:
        return self._result(self._operands(out.producer(), channel_axis=1, rank=2))

    def rewrite(self, op, a, w, out, **_):
        pair = digits(op, self._node, self._input)
        return digit_products(op, pair, self._weight, self._weight.values, None)


class DigitGemm(_DigitRule):
    """``Gemm(DQ16(a), DQ(w)[, c])`` (``transA`` 0, ``alpha`` and ``beta`` 1) -> the digit
    products, ``w`` transposed offline where ``transB``."""

    root_ops = frozenset({"Gemm"})

    def pattern(self, op, a, w):
        return op.Gemm(a, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, a, w, out, **_) -> MatchResult:
        gemm = out.producer()
        self._transposed = bool(gemm.attributes.get_int("transB", 0))
        problem = self._operands(gemm, channel_axis=0 if self._transposed else 1, rank=2)
        if problem is None and gemm.attributes.get_int("transA", 0):
            problem = "transA is set"
        if problem is None and any(
            gemm.attributes.get_float(k, 1.0) != 1.0 for k in ["alpha", "beta"]
        ):
            problem = "alpha or beta is not 1"
        if problem is None:
            columns = constant(self._weight.values).shape[0 if self._transposed else 1]
            self._bias, problem = float_bias(gemm, 2, columns)
        return self._result(problem)

    def rewrite(self, op, a, w, out, **_):
        node, weight = self._node, self._weight
        values = weight.values
        if self._transposed:
            values = new_initializer(op, node, "weight_kn", constant(values).T)
        bias = None if self._bias is None else new_initializer(op, node, "bias", self._bias)
        return digit_products(op, digits(op, node, self._input), weight, values, bias)


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    @classmethod
    def of(cls, conv: ir.Node, kernel: tuple[int, int]) -> _ConvGeometry:
        def ints(name: str, default: list[int]) -> tuple[int, ...]:
            attribute = conv.attributes.get(name)
            return tuple(attribute.as_ints()) if attribute is not None else tuple(default)

        return cls(
            kernel,
            ints("strides", [1, 1]),
            ints("dilations", [1, 1]),
            ints("pads", [0, 0, 0, 0]),
        )

    def taps(self) -> list[tuple[int, int]]:
        """The (row, column) offset of each kernel tap, in the weight's ``(i, j)`` order."""
        return [
            (i * self.dilations[0], j * self.dilations[1])
            for i in range(self.kernel[0])
            for j in range(self.kernel[1])
        ]

    def reach(self, axis: int) -> int:
        """How far the last tap lies past the first along ``axis``."""
        return self.dilations[axis] * (self.kernel[axis] - 1)

    def padded(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return height + top + bottom, width + left + right

    def positions(self, height: int, width: int) -> np.ndarray:
        """``[Ho, Wo, kh kw]``: the flat position ``y W + x`` in the padded ``height x width``
        input that each output position's taps read."""
        size = [
            (n - self.reach(a) - 1) // self.strides[a] + 1 for a, n in enumerate([height, width])
        ]
        rows = np.arange(size[0])[:, None] * self.strides[0]
        columns = np.arange(size[1])[None, :] * self.strides[1]
        taps = [(rows + i) * width + columns + j for i, j in self.taps()]
        return np.stack(taps, axis=-1).astype(np.int32)


INT64_MAX = np.iinfo(np.int64).max


class DigitConv(_DigitRule):
    """``Conv(DQ16(x), DQ(w)[, b])`` (2-D, one group) -> im2col rows of each digit, the digit
    products with ``w`` as ``[kh kw C, O]``, moved back to ``[N, O, Ho, Wo]``."""

    root_ops = frozenset({"Conv"})

    def pattern(self, op, x, w):
        return op.Conv(x, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, w, out, **_) -> MatchResult:
        conv = out.producer()
        problem = self._operands(conv, channel_axis=0, rank=4)
        if problem is None and conv.attributes.get_int("group", 1) != 1:
            problem = "it has more than one group"
        if problem is None and conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            problem = "its padding is auto_pad, not explicit pads"
        if problem is None:
            shape = constant(self._weight.values).shape
            self._geometry = _ConvGeometry.of(conv, (shape[2], shape[3]))
            self._bias, problem = float_bias(conv, 2, shape[0])
            spatial = () if x.shape is None else tuple(x.shape[2:])
            static = len(spatial) == 2 and all(isinstance(d, int) for d in spatial)
            self._padded = self._geometry.padded(*spatial) if static else None
        return self._result(problem)

    def rewrite(self, op, x, w, out, **_):
        node, weight = self._node, self._weight
        values = constant(weight.values)
        columns = values.transpose(2, 3, 1, 0).reshape(-1, values.shape[0])  # [kh kw C, O]
        weight_columns = new_initializer(op, node, "weight_columns", columns)
        channels_last = dataclasses.replace(self._input, source=_channels_last(op, self._input))
        if self._padded is not None:
            array = self._geometry.positions(*self._padded)
            taps = new_initializer(op, node, "tap_positions", array)
        else:
            taps = self._tap_bounds(op)
        pair = tuple(
            dataclasses.replace(d, values=self._rows(op, d, f"digit{index}", taps))
            for index, d in enumerate(digits(op, node, channels_last))
        )
        bias = None if self._bias is None else new_initializer(op, node, "bias", self._bias)
        product = digit_products(op, pair, weight, weight_columns, bias)
        return op.Transpose(product, perm=[0, 3, 1, 2])

    def _tap_bounds(self, op) -> list[tuple[ir.Value, ...]]:
        """(starts, ends, axes, steps) of each tap's Slice over ``[N, H, W, C]``."""
        node, geometry = self._node, self._geometry
        axes = new_initializer(op, node, "tap_axes", np.array([1, 2], np.int64))
        steps = new_initializer(op, node, "tap_steps", np.array(geometry.strides, np.int64))
        bounds = []
        for index, (row, column) in enumerate(geometry.taps()):
            starts = np.array([row, column], np.int64)
            ends = np.array(
                [_end(geometry.reach(0) - row), _end(geometry.reach(1) - column)], np.int64
            )
            bounds.append(
                (
                    new_initializer(op, node, f"tap{index}_starts", starts),
                    new_initializer(op, node, f"tap{index}_ends", ends),
                    axes,
                    steps,
                )
            )
        return bounds

    def _rows(self, op, digit: Digit, name: str, taps: ir.Value | list[tuple]) -> ir.Value:
        """The im2col rows ``[N, Ho, Wo, kh kw C]`` of one digit ``[N, H, W, C]``: one Gather
        of the taps' positions where the input's height and width are known, else a Slice per
        tap's bounds."""
        values = digit.values
        if any(self._geometry.pads):
            top, left, bottom, right = self._geometry.pads
            pads = np.array([0, top, left, 0, 0, bottom, right, 0], np.int64)
            values = op.Pad(
                values, new_initializer(op, self._node, f"{name}_pads", pads), digit.zero_point
            )
        if isinstance(taps, list):
            sliced = [op.Slice(values, *bounds) for bounds in taps]
            return sliced[0] if len(sliced) == 1 else op.Concat(*sliced, axis=-1)
        height, width = self._padded
        flat = op.Reshape(values, op.Constant(value_ints=[0, height * width, -1]))
        rows = op.Gather(flat, taps, axis=1)
        output = taps.const_value.shape[:2]
        return op.Reshape(rows, op.Constant(value_ints=[0, *output, -1]))


TO_CHANNELS_FIRST = (0, 3, 1, 2)


def _channels_last(op, found: SixteenBitInput) -> ir.Value:
    """The Conv's float input as ``[N, H, W, C]``: the tensor a channels-first Transpose read
    (an NHWC exporter's, whose pair then cancels), else the input transposed."""
    producer = found.source.producer()
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get("perm")
        if perm is not None and tuple(perm.as_ints()) == TO_CHANNELS_FIRST:
            return producer.inputs[0]
    return op.Transpose(found.source, perm=[0, 2, 3, 1])


def _end(short: int) -> int:
    """A Slice end ``short`` elements before the axis's end (its end itself when 0)."""
    return -short if short else INT64_MAX


__all__ = ["SIXTEEN_BIT", "DigitConv", "DigitGemm", "DigitMatMul", "digits", "sixteen_bit_input"]
