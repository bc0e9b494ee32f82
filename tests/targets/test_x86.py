"""x86 targets: the integer kernels onnxruntime picks for their output give exact int32 sums."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.graph.model_io import serialize
from qgraph.targets import VNNI_FLAGS, QuantFormat, host_cpu_flags

K, N, ROWS = 256, 32, 16
INTEGER_KERNELS = {
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "QLinearConv",
    "QGemm",
}
RNG = np.random.default_rng(5)


def worst_case_matmul() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """x in [0, 1] times W near +-1: activations quantize near 255, weights near +-127, so
    every pair of u8 x s8 products exceeds int16 (2 * 250 * 120 > 32767)."""
    signs = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    weight = (RNG.uniform(0.95, 1.0, (K, N)) * signs).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "worst_case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])],
        [numpy_helper.from_array(weight, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calibration = [{"x": RNG.uniform(0.0, 1.0, (ROWS, K)).astype(np.float32)}]
    return proto, calibration


def kernels_used(model: bytes, folder) -> set[str]:
    """The op types of onnxruntime's optimized graph for ``model``."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def deviation_from_qdq_reference(target: str, folder) -> tuple[float, float, set[str]]:
    """(max |optimized - Q/DQ reference|, its float32 bound, kernels onnxruntime used)."""
    proto, calibration = worst_case_matmul()
    quantization = qgraph.quant_options(calib=calibration, budget="none")  # kernels, not speed
    options = qgraph.CompileOptions(quantization=quantization)
    model = serialize(qgraph.compile_model(proto, target, options=options).model)
    x = RNG.uniform(0.97, 1.0, (ROWS, K)).astype(np.float32)
    reference = verify.run(model, {"x": x})["y"]
    optimized = verify.run(model, {"x": x}, optimize=True)["y"]
    # The reference adds K float32 products of dequantized values (|x'| <= 1, |w'| <= 1):
    # its rounding is at most K * 2^-24 * sum |x'||w'| <= K^2 * 2^-24; the integer kernel's sum
    # is exact and rounds once when scaled.
    bound = 2 * K * K * 2.0**-24
    return float(np.abs(optimized - reference).max()), bound, kernels_used(model, folder)


def test_x86_avx2_integer_sums_are_exact_at_the_top_of_both_ranges(tmp_path):
    error, bound, kernels = deviation_from_qdq_reference("x86-avx2", tmp_path)
    assert kernels & INTEGER_KERNELS, f"onnxruntime ran no integer kernel: {sorted(kernels)}"
    assert error <= bound


HAS_VNNI = bool(host_cpu_flags() & VNNI_FLAGS)


@pytest.mark.skipif(not HAS_VNNI, reason="this host has no VNNI (AVX2 only)")
def test_full_range_s8_weights_are_exact_on_this_vnni_host(tmp_path):
    """x86-vnni's claim: ``vpdpbusd`` sums u8 x s8 products in int32, so full 8-bit weights
    at the top of both ranges do not saturate."""
    error, bound, kernels = deviation_from_qdq_reference("x86-vnni", tmp_path)
    assert kernels & INTEGER_KERNELS
    assert error <= bound


@pytest.mark.skipif(HAS_VNNI, reason="VNNI hosts do not saturate u8 x s8")
def test_full_range_s8_weights_saturate_on_this_avx2_host(tmp_path):
    """The contrast: x86-vnni's u8 x s8 output (onnxruntime's default) run without VNNI."""
    error, bound, kernels = deviation_from_qdq_reference("x86-vnni", tmp_path)
    assert kernels & INTEGER_KERNELS
    assert error > 1000 * bound, "vpmaddubsw saturated the int16 pair sums"


@pytest.mark.parametrize("quant_format", list(QuantFormat))
@pytest.mark.parametrize("name", ["reference-cnn", "reference-encoder", "reference-decoder"])
def test_x86_avx2_output_matches_the_qdq_reference_within_one_step(tmp_path, name, quant_format):
    """onnxruntime here, all optimizations (its integer kernels), against the Q/DQ model with
    none; each quantized activation judged from the same upstream integers, as in
    ``test_arm64``. The QOperator output keeps the quantized activations' names."""
    zoo = models.fetch(name)
    # Every candidate in 8 bits: the kernels' numbers are under test, not which ops the
    # accuracy plan finds faster in 8 bits on this host (on AVX2 hosts, often none).
    quantization = qgraph.quant_options(calib=zoo.calibration, budget="none")
    qdq = qgraph.compile_model(
        zoo.model, "x86-avx2", options=qgraph.CompileOptions(quantization=quantization)
    ).model
    reference = verify.QuantizedReference.of(qdq)
    options = qgraph.CompileOptions(quantization=quantization, format=quant_format)
    model = qgraph.compile_model(zoo.model, "x86-avx2", options=options).model
    verify.expose_values(model, reference.recomputed)
    exposed = serialize(model)
    kernels = kernels_used(exposed, tmp_path)
    assert kernels & INTEGER_KERNELS, f"onnxruntime ran no integer kernel: {sorted(kernels)}"
    optimized = verify.session(exposed, optimize=True)
    for feeds in itertools.islice(read_batches(zoo.evaluation), 2):
        outputs = verify.run(optimized, feeds)
        assert not reference.one_step_mismatches(feeds, outputs)
