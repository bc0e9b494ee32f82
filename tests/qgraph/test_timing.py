"""The timing cache: entries by op shape, host and runtime; anything unreadable re-measured."""

from __future__ import annotations

import dataclasses
import json

import onnx_ir as ir
import pytest

import qgraph
from qgraph import timing

SHAPE = timing.OpShape("MatMul", ((64, 128),), (128, 128), (), False)
TARGET = qgraph.get_target("x86-vnni")


def test_a_measurement_is_cached_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "measure", lambda shape, target: calls.append(1) or (2e-3, 1e-3))
    cache = timing.TimingCache(tmp_path / "timings.json")
    assert cache.seconds(SHAPE, TARGET) == (2e-3, 1e-3)
    again = timing.TimingCache(tmp_path / "timings.json")
    assert again.seconds(SHAPE, TARGET) == (2e-3, 1e-3) and len(calls) == 1


def test_a_corrupt_or_stale_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "measure", lambda shape, target: (3e-3, 1e-3))
    path = tmp_path / "timings.json"
    path.write_text("{not json")
    assert timing.TimingCache(path).seconds(SHAPE, TARGET) == (3e-3, 1e-3)
    path.write_text(json.dumps({SHAPE.key(TARGET): [-1, "x"]}))
    assert timing.TimingCache(path).seconds(SHAPE, TARGET) == (3e-3, 1e-3)


def test_the_key_names_the_types_and_the_runtime():
    u8u8 = dataclasses.replace(  # uint8 weights: another kernel
        TARGET, weights=dataclasses.replace(TARGET.weights, dtype=ir.DataType.UINT8)
    )
    assert SHAPE.key(TARGET) != SHAPE.key(u8u8)
    assert SHAPE.key(TARGET) == timing.OpShape(*timing.dataclasses.astuple(SHAPE)).key(TARGET)


def test_both_twins_run_and_time():
    float_seconds, int8_seconds = timing.measure(SHAPE, TARGET)
    assert float_seconds > 0 and int8_seconds > 0
    conv = timing.OpShape(
        "Conv",
        ((1, 8, 12, 12),),
        (16, 8, 3, 3),
        (("kernel_shape", "[3, 3]"), ("pads", "[1, 1, 1, 1]")),
        True,
    )
    assert all(seconds > 0 for seconds in timing.measure(conv, TARGET))


def test_the_cost_model_counts_each_ops_multiply_accumulates():
    conv = timing.OpShape(
        "Conv",
        ((2, 8, 12, 12),),
        (16, 4, 3, 3),  # group 2: each output sums 4 channels x 3 x 3
        (("group", "2"), ("pads", "[0, 0, 0, 0]"), ("strides", "[2, 2]")),
        True,
    )
    assert timing.macs(conv) == 2 * 16 * 5 * 5 * (4 * 3 * 3)  # (12 - 3) // 2 + 1 = 5
    gemm = timing.OpShape("Gemm", ((6, 32),), (10, 32), (("transB", "1"),), False)
    assert timing.macs(gemm) == 6 * 32 * 10
    scores = timing.OpShape("MatMul", ((2, 4, 16, 8), (2, 4, 8, 16)), None, (), False)
    assert timing.macs(scores) == 2 * 4 * 16 * 16 * 8


def test_the_cost_model_pays_for_what_it_quantizes():
    """t_int8 = macs / r + Q (quantized elements): int8 pays for a MatMul when its output
    width N gives N (1 - 1/r) > Q, never where r = 1."""
    model = timing.CostModel()
    wide = timing.OpShape("MatMul", ((128, 384),), (384, 384), (), False)
    narrow = timing.OpShape("MatMul", ((128, 384),), (384, 16), (), False)
    vnni, avx2 = qgraph.get_target("x86-vnni"), qgraph.get_target("x86-avx2")
    float_seconds, int8_seconds = model.seconds(wide, vnni)
    work = 128 * 384 * 384
    assert float_seconds * timing.NOMINAL_FP32_MACS_PER_SECOND == work
    expected = work / vnni.kernels.nominal_int8_speedup + timing.QUANTIZE_COST_MACS * 128 * 384
    assert int8_seconds * timing.NOMINAL_FP32_MACS_PER_SECOND == expected
    assert model.seconds(narrow, vnni)[1] > model.seconds(narrow, vnni)[0]
    slowest = dataclasses.replace(
        avx2, kernels=dataclasses.replace(avx2.kernels, nominal_int8_speedup=1.0)
    )
    assert model.seconds(wide, slowest)[1] > model.seconds(wide, slowest)[0]


def test_a_16_bit_activation_is_timed_as_its_digit_products_under_its_own_key():
    """The 16-bit twin is the compile's: two MatMulIntegerToFloat over the activation's 8-bit
    digits; its key differs from the 8-bit one's, which kept the key it had before."""
    wide = dataclasses.replace(SHAPE, activation_bits=16)
    assert wide.key(TARGET) != SHAPE.key(TARGET)
    legacy = json.dumps(
        [
            dataclasses.astuple(SHAPE)[:-1],
            TARGET.activations.dtype.name,
            TARGET.weights.dtype.name,
            timing.ort.__version__,
            sorted(timing.host_cpu_flags()),
        ]
    )
    assert SHAPE.key(TARGET) == timing.hashlib.sha256(legacy.encode()).hexdigest()[:24]
    _, quantized, _ = timing._twins(wide, TARGET, timing.np.random.default_rng(0))
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    assert all(seconds > 0 for seconds in timing.measure(wide, TARGET))
    model = timing.CostModel()
    assert model.seconds(wide, TARGET)[1] == 2 * model.seconds(SHAPE, TARGET)[1]


def test_a_row_lookup_is_timed_from_a_float_and_an_8_bit_table():
    lookup = timing.OpShape("Gather", ((4, 256),), (300, 64), (), False)
    _, quantized, feeds = timing._twins(lookup, TARGET, timing.np.random.default_rng(0))
    assert [node.op_type for node in quantized.graph.node] == ["Gather", "Gather", "Cast", "Mul"]
    assert feeds["x0"].max() < 300
    assert all(seconds > 0 for seconds in timing.measure(lookup, TARGET))
    moved, dequantized = timing.CostModel().seconds(lookup, TARGET)
    assert dequantized == pytest.approx(moved * (1 + timing.QUANTIZE_COST_MACS / 2))
