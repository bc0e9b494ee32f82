"""Degenerate calibration data never gives a silent zero model: scales have a floor, an int32
bias that would saturate keeps its op float, and a range a few values dominate keeps its
readers float; each said in a warning naming the node or the tensor and the batch."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

import qgraph
from qgraph import verify
from qgraph.quant.calibration import TensorStatistics, dominated
from qgraph.quant.spec import SCALE_FLOOR, QuantSpec, scale_and_zero_point

FLOAT32_TINY = np.finfo(np.float32).tiny


def _compile(model, batches, method: str = "minmax"):
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=batches, budget="none", calib_method=method)
    )
    return qgraph.compile_model(model, "x86-avx2", options=options)


def _batches(count: int, scale: float = 1.0, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((2, 4)) * scale).astype(np.float32)} for _ in range(count)]


def _float_reasons(result) -> dict[str, tuple[str, str]]:
    return next(r for r in result.records if r.name == "insert-qdq").details.float_reasons


def test_scales_of_denormal_ranges_are_normal_floats_at_the_floor():
    for dtype, symmetric in ((ir.DataType.UINT8, False), (ir.DataType.INT8, True)):
        scale, _ = scale_and_zero_point(-1e-41, 1e-40, QuantSpec(dtype, symmetric))
        assert float(scale) == np.float32(SCALE_FLOOR)
    assert np.float32(SCALE_FLOOR) * np.float32(SCALE_FLOOR) >= FLOAT32_TINY, "bias scale normal"


def test_denormal_data_keeps_the_biased_op_float_and_says_why(small_model, caplog):
    feeds = _batches(1)[0]
    with caplog.at_level(logging.WARNING):
        result = _compile(small_model, _batches(4, scale=1e-40))
    reasons = _float_reasons(result)
    assert any("int32 bias would saturate" in reason for _, reason in reasons.values())
    assert "int32 bias would saturate" in caplog.text and "spans only" in caplog.text
    expected = verify.run(qgraph.load(small_model), feeds)["y"]
    np.testing.assert_allclose(verify.run(result.model, feeds)["y"], expected, rtol=1e-5)


def test_one_huge_outlier_keeps_the_readers_float_naming_tensor_and_batch(small_model, caplog):
    batches = _batches(8)
    batches[5]["x"][0, 0] = 1e30
    feeds = _batches(1, seed=7)[0]
    expected = verify.run(qgraph.load(small_model), feeds)["y"]
    for method in ("minmax", "percentile", "entropy", "mse"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = _compile(small_model, batches, method)
        assert "range of 'x' is dominated by a few values" in caplog.text, method
        assert "batch 6" in caplog.text
        output = verify.run(result.model, feeds)["y"]
        assert np.any(output != 0), method
        np.testing.assert_allclose(output, expected, rtol=1e-5)


def _stats(values: np.ndarray) -> TensorStatistics:
    stats = TensorStatistics(histogram=True)
    stats.update(values)
    return stats


def test_mostly_zeros_and_heavy_tails_are_not_dominated():
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal(100_000), 0) * (rng.random(100_000) < 0.01)
    stats = _stats(relu)
    assert not dominated(stats, stats.absmax / 255)
    logits = rng.standard_normal((64, 128)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    stats = _stats(probabilities)
    assert not dominated(stats, stats.absmax / 255)
    spiked = rng.standard_normal(100_000)
    spiked[7] = 1e30
    stats = _stats(spiked)
    assert dominated(stats, stats.absmax / 255)
