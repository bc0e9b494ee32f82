"""Quantization math against hand-computed scales, zero points and integers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.quant.spec import (
    CLIP_RATIOS,
    QuantSpec,
    dequantize,
    fake_quantize_weight,
    quantize,
    quantize_bias,
    quantize_weight,
    scale_and_zero_point,
    searched_range,
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
    assert q.tolist() == [1, 128, 255]  # unclipped: the U8U8 weights of x86-avx2


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
    """Blocks of 2 along axis 0 of a [5, 3] weight (a tail of 1): each block of each column gets
    its own scale, a clip of its max |w| / 7, and every value its grid's nearest level."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 3)).astype(np.float32)
    spec = QuantSpec(ir.DataType.INT4, symmetric=True, axis=0, block_size=2)
    quantized = quantize_weight(weight, spec)
    assert quantized.scale.shape == (3, 3) and quantized.values.shape == (5, 3)
    ratios = quantized.scale[1] / (np.abs(weight[2:4]).max(axis=0) / 7)
    assert np.all(np.min(np.abs(ratios[:, None] - CLIP_RATIOS), axis=1) < 1e-6)
    scale = np.repeat(quantized.scale, 2, axis=0)[:5]
    expected = np.clip(np.rint(weight / scale), -7, 7)
    np.testing.assert_array_equal(quantized.values, expected)


def reference_block_range(block: np.ndarray, spec: QuantSpec, importance: np.ndarray):
    """The scale and zero point of one block, by trying every clip ratio in turn."""
    errors = []
    for ratio in CLIP_RATIOS:
        scale, zero_point = scale_and_zero_point(block.min() * ratio, block.max() * ratio, spec)
        rounded = dequantize(quantize(block, scale, zero_point, spec), scale, zero_point)
        errors.append((np.sum(importance * (block - rounded) ** 2), scale, zero_point))
    return min(errors, key=lambda found: found[0])[1:]


@pytest.mark.parametrize("dtype", [ir.DataType.INT4, ir.DataType.UINT4])
def test_searched_range_is_the_clip_with_the_least_weighted_rounding_error(dtype):
    rng = np.random.default_rng(1)
    blocks = rng.standard_t(4, (40, 16))  # heavy tails: min/max is seldom the best range
    importance = rng.uniform(0.1, 10.0, 16)
    spec = QuantSpec(dtype, symmetric=dtype == ir.DataType.INT4, axis=1, block_size=16)
    scale, zero_point = searched_range(blocks, 1, spec, importance)
    expected = [reference_block_range(block, spec, importance) for block in blocks]
    np.testing.assert_array_equal(scale, [found[0] for found in expected])
    np.testing.assert_array_equal(zero_point, [found[1] for found in expected])
    assert np.mean(scale < scale_and_zero_point(blocks.min(1), blocks.max(1), spec)[0]) > 0.5


def test_the_range_search_weighs_rounding_errors_by_importance():
    """With all the importance on one value of a block, that value is rounded more exactly than
    by the unweighted search, for most of the block's values."""
    block = np.random.default_rng(3).standard_normal((1, 16))
    spec = QuantSpec(ir.DataType.UINT4, symmetric=False, axis=1, block_size=16)

    def error_at(position: int, scale: np.ndarray, zero_point: np.ndarray) -> float:
        value = block[0, position]
        return abs(dequantize(quantize(value, scale, zero_point, spec), scale, zero_point) - value)

    uniform = searched_range(block, 1, spec)
    better = 0
    for position in range(16):
        weighted = searched_range(block, 1, spec, np.eye(16)[position])
        assert error_at(position, *weighted) <= error_at(position, *uniform) + 1e-7
        better += error_at(position, *weighted) < error_at(position, *uniform) - 1e-7
    assert better >= 8


def test_clipped_4_bit_blocks_cut_the_rounding_error_of_min_max_on_gaussian_weights():
    weight = np.random.default_rng(2).standard_normal((4096, 32)).astype(np.float32)
    spec = QuantSpec(ir.DataType.INT4, symmetric=True, axis=1, block_size=32)
    searched = np.mean((fake_quantize_weight(weight, spec) - weight) ** 2)
    scale, zero_point = scale_and_zero_point(
        np.abs(weight).max(1, keepdims=True) * -1, np.abs(weight).max(1, keepdims=True), spec
    )
    min_max = np.mean(
        (dequantize(quantize(weight, scale, zero_point, spec), scale, zero_point) - weight) ** 2
    )
    assert searched < 0.9 * min_max  # measured: 0.88


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
def test_fake_quantized_blocks_are_within_half_a_step_or_clipped(axis):
    """Each value moves by at most half its block's step, or is clipped to the block's end
    level: uint4 blocks of 8 along ``axis`` of a [20, 12] weight (a tail block of 4 on axis 0)."""
    weight = np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)
    spec = QuantSpec(ir.DataType.UINT4, symmetric=False, axis=axis, block_size=8)
    quantized = quantize_weight(weight, spec)
    scale = np.repeat(quantized.scale, 8, axis=axis).take(np.arange(weight.shape[axis]), axis)
    zero = np.repeat(quantized.zero_point, 8, axis=axis).take(np.arange(weight.shape[axis]), axis)
    low, high = (0 - zero.astype(np.float64)) * scale, (15 - zero.astype(np.float64)) * scale
    result = fake_quantize_weight(weight, spec)
    expected = np.clip(weight, low, high)
    assert np.all(np.abs(result - expected) <= scale / 2 * (1 + 1e-5) + 1e-7)
