"""Quantization specs, and the affine integer mapping each one describes.

A tensor ``x`` is stored as integers ``q`` with a scale ``s > 0`` and a zero point ``z``:

    q = clamp(round(x / s) + z, qmin, qmax)        x' = (q - z) * s

``round`` is round-half-to-even, as ONNX ``QuantizeLinear`` does. A spec with ``bits`` below the
dtype's width uses only part of its range (7-bit weights in int8: ``[-63, 63]``). From a range
``[lo, hi]``, first widened to hold 0 so that zero (padding, ReLU) is exact:

    symmetric:   s = max(|lo|, |hi|) / h,   h = floor((qmax - qmin) / 2),   z = 0 (signed)
                 or 2^(bits-1) (unsigned), so that both +-max fit: uint8 holds [1, 255]
    asymmetric:  s = (hi - lo) / (qmax - qmin),           z = round(qmin - lo / s)

The rounding error of an in-range value is at most ``s / 2``. Per-channel specs give every slice
along ``axis`` its own range; per-block specs give every ``block_size`` run along ``axis`` its own.
A bias is stored as int32 with scale ``s_x * s_w`` (per output channel) and zero point 0, so the
integer accumulator of a quantized Conv or Gemm adds it directly.

Degenerate ranges. Every scale is at least ``SCALE_FLOOR = 2^-63``: then the product of any two
scales, the bias scale ``s_x * s_w``, is at least ``2^-126``, float32's smallest normal number,
so no scale and no bias scale is a denormal (a range of denormals, ``|x| ~ 1e-40``, gave
``s = 7.96e-43`` and a model whose every input saturated). Values under ``s / 2`` quantize to 0,
as such tiny values do in any 8-bit format. A bias saturates int32 where
``|b| / (s_x * s_w) > 2^31 - 1`` (``bias_levels``): clipping it would change the op's output by
up to ``|b|``, so the Q/DQ pass keeps such an op in float rather than raise ``s_x`` (a coarser
input step would cost every other value of the tensor accuracy).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

INTEGER_DTYPES = {
    ir.DataType.INT4: np.int8,
    ir.DataType.UINT4: np.uint8,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.INT32: np.int32,
}
"""Quantized dtypes and the numpy type that holds their values (4-bit ones in a byte)."""

DTYPE_NAMES = {dtype.name.lower(): dtype for dtype in INTEGER_DTYPES}
"""``"int8"`` -> ``ir.DataType.INT8``, for flags and recipe files."""

SCALE_FLOOR = 2.0**-63
"""The smallest scale: any product of two scales is then a normal float32 (>= 2^-126)."""

INT32_LIMIT = 2**31 - 1
"""The largest magnitude an int32 bias holds."""

OPSET_21_DTYPES = frozenset(
    {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT16, ir.DataType.UINT16}
)
"""Quantized dtypes the default-domain Q/DQ ops accept only from opset 21."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: The integer type of the stored values.
        symmetric: Zero point fixed at the middle of the range (0 for signed types).
        bits: Bits of the range used (the dtype's width unless narrowed).
        axis: Per-channel (or per-block) axis; None for one scale for the whole tensor.
        block_size: Length of each block along ``axis``; None for one scale per channel.
        method: Calibration method that sets an activation's range (weights use min/max).
    """

    dtype: ir.DataType
    symmetric: bool
    bits: int | None = None
    axis: int | None = None
    block_size: int | None = None
    method: str = "minmax"

    @property
    def width(self) -> int:
        return self.bits or self.dtype.bitwidth

    @property
    def signed(self) -> bool:
        return self.dtype.is_signed()

    def integer_range(self) -> tuple[int, int]:
        """``(qmin, qmax)``; a symmetric signed range drops the lone most negative value."""
        if self.signed:
            top = 2 ** (self.width - 1) - 1
            return (-top if self.symmetric else -top - 1), top
        return 0, 2**self.width - 1

    @property
    def min_opset(self) -> int:
        """Lowest default-domain opset whose Q/DQ ops carry this spec."""
        if self.dtype in OPSET_21_DTYPES or self.block_size is not None:
            return 21
        return 13 if self.axis is not None else 10

    def describe(self) -> str:
        """``int8 symmetric per-channel(axis 0)``-style text for reports."""
        granularity = "per-tensor"
        if self.block_size is not None:
            granularity = f"per-block({self.block_size}, axis {self.axis})"
        elif self.axis is not None:
            granularity = f"per-channel(axis {self.axis})"
        bits = f" {self.bits}-bit" if self.bits and self.bits != self.dtype.bitwidth else ""
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.dtype.name.lower()}{bits} {kind} {granularity}"


def scale_and_zero_point(
    lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32, at least ``SCALE_FLOOR``; 1 for an all-zero range) and zero point (the
    spec's dtype) for ranges ``[lo, hi]`` (broadcast)."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    natural = natural_scale(lo, hi, spec)
    scale = np.where(natural > 0, np.maximum(natural, SCALE_FLOOR), 1.0)
    qmin, qmax = spec.integer_range()
    if spec.symmetric:
        zero_point = np.full(scale.shape, (qmin + qmax + 1) // 2 if not spec.signed else 0)
    else:
        zero_point = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return scale.astype(np.float32), zero_point.astype(INTEGER_DTYPES[spec.dtype])


def natural_scale(lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec) -> np.ndarray:
    """The scale that maps ``[lo, hi]`` (widened to hold 0) onto the spec's integers, before
    the floor: below ``SCALE_FLOOR`` it says the range is degenerate."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = spec.integer_range()
    if spec.symmetric:
        return np.maximum(-lo, hi) / ((qmax - qmin) // 2)
    return (hi - lo) / (qmax - qmin)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """``clamp(round(x / s) + z, qmin, qmax)``, with scale and zero point broadcast to ``x``."""
    qmin, qmax = spec.integer_range()
    q = np.rint(x.astype(np.float64) / scale) + zero_point.astype(np.float64)
    return np.clip(q, qmin, qmax).astype(INTEGER_DTYPES[spec.dtype])


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """``(q - z) * s``, in float32."""
    return ((q.astype(np.float64) - zero_point.astype(np.float64)) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A constant quantized offline: the integers, and the scale and zero point DQ reads.

    ``scale`` and ``zero_point`` have DequantizeLinear's layout: a scalar per tensor, a vector
    along ``axis`` per channel, the input's shape with ``axis`` shrunk to the block count per block.
    """

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


def quantize_weight(weight: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """``weight`` quantized to ``spec`` from its own min/max (per tensor, channel or block)."""
    if spec.axis is None:
        scale, zero_point = scale_and_zero_point(weight.min(), weight.max(), spec)
        return QuantizedTensor(quantize(weight, scale, zero_point, spec), scale, zero_point)
    axis = spec.axis % weight.ndim
    if spec.block_size is None:
        others = tuple(d for d in range(weight.ndim) if d != axis)
        scale, zero_point = scale_and_zero_point(
            weight.min(axis=others), weight.max(axis=others), spec
        )
        shape = [1] * weight.ndim
        shape[axis] = -1
        values = quantize(weight, scale.reshape(shape), zero_point.reshape(shape), spec)
        return QuantizedTensor(values, scale, zero_point)
    blocks = _split_blocks(weight, axis, spec.block_size)
    scale, zero_point = scale_and_zero_point(
        blocks.min(axis=axis + 1), blocks.max(axis=axis + 1), spec
    )
    values = quantize(
        blocks, np.expand_dims(scale, axis + 1), np.expand_dims(zero_point, axis + 1), spec
    )
    return QuantizedTensor(_join_blocks(values, axis, weight.shape[axis]), scale, zero_point)


def fake_quantize_weight(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``weight`` quantized to ``spec`` and back (per tensor, channel or block)."""
    quantized = quantize_weight(weight, spec)
    scale, zero_point = quantized.scale, quantized.zero_point
    if spec.axis is not None:
        axis = spec.axis % weight.ndim
        if spec.block_size is None:
            shape = [1] * weight.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        else:
            kept = np.arange(weight.shape[axis])
            scale = np.repeat(scale, spec.block_size, axis=axis).take(kept, axis=axis)
            zero_point = np.repeat(zero_point, spec.block_size, axis=axis).take(kept, axis=axis)
    return dequantize(quantized.values, scale, zero_point)


def _split_blocks(weight: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``weight`` with ``axis`` split into ``(blocks, block)``, the tail padded with zeros."""
    length = weight.shape[axis]
    count = -(-length // block)
    pad = [(0, 0)] * weight.ndim
    pad[axis] = (0, count * block - length)
    padded = np.pad(weight, pad)
    return padded.reshape(*weight.shape[:axis], count, block, *weight.shape[axis + 1 :])


def _join_blocks(blocks: np.ndarray, axis: int, length: int) -> np.ndarray:
    shape = (*blocks.shape[:axis], -1, *blocks.shape[axis + 2 :])
    return np.take(blocks.reshape(shape), np.arange(length), axis=axis)


def quantize_bias(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> QuantizedTensor:
    """``bias`` as int32 with scale ``s_x * s_w`` and zero point 0 (clipped where it saturates:
    check ``bias_levels`` first)."""
    scale = _bias_scale(bias, input_scale, weight_scale)
    limit = np.iinfo(np.int32)
    values = np.clip(np.rint(bias.astype(np.float64) / scale), limit.min, limit.max)
    return QuantizedTensor(values.astype(np.int32), scale, np.zeros(bias.shape, np.int32))


def bias_levels(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> float:
    """``max |b| / (s_x * s_w)``: the largest int32 the bias needs; over ``INT32_LIMIT`` it
    saturates."""
    scale = _bias_scale(bias, input_scale, weight_scale).astype(np.float64)
    return float(np.max(np.abs(bias.astype(np.float64)) / scale, initial=0.0))


def _bias_scale(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    return np.broadcast_to(scale, bias.shape).copy()
