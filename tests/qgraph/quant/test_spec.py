"""Quantization math against hand-computed scales, zero points and integers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.quant.spec import (
    QuantSpec,
    dequantize,
    fake_quantize_weight,
    quantize,
    quantize_bias,
    quantize_weight,
    scale_and_zero_point,
)

U8 = QuantSpec(ir.DataType.UINT8, symmetric=False)
S8_7BIT = QuantSpec(ir.DataType.INT8, symmetric=True, bits=7)


def test_asymmetric_uint8_range():
    scale, zero_point = scale_and_zero_point(-1.0, 3.0, U8)
    assert scale == np.float32(4 / 255)
    assert zero_point == 64 and zero_point.dtype == np.uint8  # round(0 + 1 / (4/255)) = 63.75


def test_range_is_widened_to_hold_zero():
    scale, zero_point = scale_and_zero_point(0.5, 2.0, U8)
    assert scale == np.float32(2 / 255) and zero_point == 0


def test_seven_bit_symmetric_int8_uses_plus_minus_63():
    assert S8_7BIT.integer_range() == (-63, 63)
    scale, zero_point = scale_and_zero_point(-2.0, 1.0, S8_7BIT)
    assert scale == np.float32(2 / 63) and zero_point == 0
    q = quantize(np.array([-2.0, 0.25, 5.0], np.float32), scale, zero_point, S8_7BIT)
    assert q.tolist() == [-63, 8, 63]  # 0.25 / (2/63) = 7.875; 5 clamps


def test_symmetric_uint8_centres_on_128_and_holds_both_extremes():
    spec = QuantSpec(ir.DataType.UINT8, symmetric=True)
    scale, zero_point = scale_and_zero_point(-0.5, 1.27, spec)
    assert scale == np.float32(1.27 / 127) and zero_point == 128
    q = quantize(np.array([-1.27, 0.0, 1.27], np.float32), scale, zero_point, spec)
    assert q.tolist() == [1, 128, 255]  # unclipped: both extremes held


def test_rounding_is_half_to_even_like_quantize_linear():
    scale, zero_point = np.float32(1.0), np.uint8(0)
    q = quantize(np.array([0.5, 1.5, 2.5], np.float32), scale, zero_point, U8)
    assert q.tolist() == [0, 2, 2]


def test_an_all_zero_tensor_gets_scale_one():
    scale, zero_point = scale_and_zero_point(0.0, 0.0, S8_7BIT)
    assert scale == 1.0 and zero_point == 0


def test_integer_ranges():
    assert QuantSpec(ir.DataType.INT8, symmetric=False).integer_range() == (-128, 127)
    assert QuantSpec(ir.DataType.INT4, symmetric=True).integer_range() == (-7, 7)
    assert QuantSpec(ir.DataType.UINT4, symmetric=False).integer_range() == (0, 15)
    assert QuantSpec(ir.DataType.INT16, symmetric=False).integer_range() == (-32768, 32767)


def test_per_channel_weight_has_a_scale_per_output_column():
    weight = np.array([[1.0, -4.0], [2.0, 2.0]], np.float32)
    spec = QuantSpec(ir.DataType.INT8, symmetric=True, axis=1)
    quantized = quantize_weight(weight, spec)
    np.testing.assert_array_equal(quantized.scale, np.float32([2 / 127, 4 / 127]))
    assert quantized.values.tolist() == [[64, -127], [127, 64]]  # 63.5 -> 64, 63.5 -> 64


def test_per_block_weight_scales_each_block_of_each_column():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 3)).astype(np.float32)
    spec = QuantSpec(ir.DataType.INT4, symmetric=True, axis=0, block_size=2)
    quantized = quantize_weight(weight, spec)
    assert quantized.scale.shape == (3, 3) and quantized.values.shape == (5, 3)
    expected = np.abs(weight[2:4]).max(axis=0) / 7
    np.testing.assert_allclose(quantized.scale[1], expected, rtol=1e-6)
    scale = np.repeat(quantized.scale, 2, axis=0)[:5]
    error = np.abs(dequantize(quantized.values, scale, np.zeros_like(scale)) - weight)
    assert (error <= scale / 2 + 1e-7).all()
    assert np.abs(quantized.values).max() <= 7


def test_bias_is_int32_at_input_times_weight_scale():
    quantized = quantize_bias(np.array([1.0, -0.5], np.float32), 0.1, np.float32([0.01, 0.02]))
    np.testing.assert_allclose(quantized.scale, [0.001, 0.002], rtol=1e-6)
    assert quantized.values.tolist() == [1000, -250] and quantized.values.dtype == np.int32


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (S8_7BIT, "int8 7-bit symmetric per-tensor"),
        (
            QuantSpec(ir.DataType.INT4, True, axis=0, block_size=32),
            "int4 symmetric per-block(32, axis 0)",
        ),
        (QuantSpec(ir.DataType.INT8, True, axis=1), "int8 symmetric per-channel(axis 1)"),
    ],
)
def test_describe(spec, text):
    assert spec.describe() == text


@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quantized_blocks_are_within_half_a_step(axis):
    """Each value moves by at most half its block's step: (max - min) / 15 / 2 for uint4, 4-bit
    blocks of 8 along ``axis`` of a [20, 12] weight (a tail block of 4 on axis 0)."""
    weight = np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)
    spec = QuantSpec(ir.DataType.UINT4, symmetric=False, axis=axis, block_size=8)
    result = fake_quantize_weight(weight, spec)
    blocks = [slice(start, start + 8) for start in range(0, weight.shape[axis], 8)]
    for block in blocks:
        part = (weight[block], result[block]) if axis == 0 else (weight[:, block], result[:, block])
        spread = np.maximum(part[0].max(axis, keepdims=True), 0) - np.minimum(
            part[0].min(axis, keepdims=True), 0
        )
        step = spread / 15
        assert np.all(np.abs(part[1] - part[0]) <= step / 2 * (1 + 1e-5) + 1e-7)
