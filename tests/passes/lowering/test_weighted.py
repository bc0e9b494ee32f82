"""Lowering of weighted ops: each rule fires where it should, and the lowered model computes
what the Q/DQ model does.

The judge is ``verify.QuantizedReference``: the Q/DQ model, run with onnxruntime's
optimizations off (its literal arithmetic), recomputes every quantized activation from the
lowered run's own upstream integers; each must be within one step (the integer kernels round
``s_a s_w / s_y * sum`` in another order, which can move a value lying within float32 rounding
of a step boundary by one step), and each float output within ``FLOAT32_RTOL`` (the integer sum
is exact; only its scaling is rounded differently).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.passes.lowering import LoweringUnavailableError, LowerPass, compiled_rules
from qgraph.passes.rule_table import near_misses
from qgraph.targets import VNNI_FLAGS, QuantFormat, host_cpu_flags

VNNI_HOST = bool(host_cpu_flags() & VNNI_FLAGS)
CPU_TARGETS = (
    "x86-avx2",
    pytest.param(
        "x86-vnni",
        marks=pytest.mark.skipif(
            not VNNI_HOST,
            reason="x86-vnni's full-range u8 x s8 saturates without VNNI (tests/targets/test_x86)",
        ),
    ),
    "arm64",
)
K, N = 24, 16
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, N)).astype(np.float32)


def compile_qdq(model, target, **flags) -> ir.Model:
    """``model`` in Q/DQ form (dynamic mode included), every candidate quantized, before the
    runtime check puts groups onnxruntime leaves unfused back in float."""
    flags.setdefault("budget", "none")
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(**flags),
        format=QuantFormat.QDQ,
        skip_passes=frozenset({"runtime-check"}),
    )
    return qgraph.compile_model(model, target, options=options).model


def lower(model: ir.Model, target: str) -> tuple[ir.Model, dict[str, int]]:
    """A lowered copy of ``model`` (its quantized activations exposed) and rewrites per rule."""
    copy = ir.from_proto(ir.to_proto(model))
    verify.expose_quantized(copy)
    result = LowerPass(qgraph.get_target(target))(copy)
    return result.model, result.details.applied


def assert_matches_qdq(qdq: ir.Model, lowered: ir.Model, batches) -> None:
    reference = verify.QuantizedReference.of(qdq)
    session = verify.session(lowered, optimize=False)
    for feeds in batches:
        assert not reference.one_step_mismatches(feeds, verify.run(session, feeds))


def near_miss_reasons(model: ir.Model, target: str) -> set[str]:
    return {m.reason for m in near_misses(model, compiled_rules(qgraph.get_target(target)))}


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def mlp() -> ir.Model:
    """x[10, K] -> MatMul(W) -> Relu -> Gemm(W^T, b, transB) -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W_T", "b"], ["y"], name="gemm", transB=1),
    ]
    initializers = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(RNG.standard_normal((8, N)).astype(np.float32), "W_T"),
        numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 8])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def mlp_batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((10, K)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_a_matmul_with_a_quantized_output_and_a_gemm_lower_and_match(target):
    qdq = compile_qdq(mlp(), target, calib=mlp_batches(4, seed=1))
    lowered, applied = lower(qdq, target)
    assert applied["qlinear-matmul"] == 1, "Q(Relu(MatMul)) with z_y at the minimum"
    assert applied["qgemm"] == 1
    assert {"QLinearMatMul", "QGemm"} <= set(op_counts(lowered))
    assert "MatMul" not in op_counts(lowered) and "Relu" not in op_counts(lowered)
    assert_matches_qdq(qdq, lowered, mlp_batches(3, seed=7))


@pytest.mark.parametrize("target", CPU_TARGETS[:2])
def test_dynamic_mode_lowers_to_matmul_integer_to_float(target):
    """(Not arm64 here: its dynamic u8 activations meet full-range s8 weights, which this
    host's u8 x s8 kernels saturate, as for x86-vnni.)"""
    qdq = compile_qdq(mlp(), target, mode="dynamic")
    lowered, applied = lower(qdq, target)
    assert applied["matmul-integer-to-float"] == 1 and applied["qgemm"] == 1
    assert op_counts(lowered)["DynamicQuantizeLinear"] == 2
    assert op_counts(lowered)["Add"] == 1, "the float bias follows QGemm"
    assert_matches_qdq(qdq, lowered, mlp_batches(3, seed=7))


REFERENCE_LOWERINGS = {
    "reference-cnn": {"qlinear-conv": 6, "qgemm": 1},  # each Conv has a Q on its output
    "reference-encoder": {"matmul-integer-to-float": 6},
    "reference-decoder": {"matmul-integer-to-float": 7},  # its attention products stay Q/DQ
}


@pytest.mark.parametrize("name", REFERENCE_LOWERINGS)
def test_reference_models_lower_and_match_the_qdq_reference_within_one_step(name):
    zoo = models.fetch(name)
    qdq = compile_qdq(zoo.model, "x86-avx2", calib=zoo.calibration)
    lowered, applied = lower(qdq, "x86-avx2")
    assert {rule: n for rule, n in applied.items() if n} == REFERENCE_LOWERINGS[name]
    assert_matches_qdq(qdq, lowered, itertools.islice(read_batches(zoo.evaluation), 2))


def test_conv_integer_needs_uint8_activations_and_says_so():
    """arm64's int8 activations: onnxruntime's ConvInteger reads uint8 only, so the float-output
    Convs stay in Q/DQ form with that reason, while QLinearConv takes int8."""
    zoo = models.fetch("reference-cnn")
    arm = qgraph.get_target("arm64")
    arm64 = dataclasses.replace(
        arm, kernels=dataclasses.replace(arm.kernels, output_quantized_ops=frozenset())
    )
    qdq = compile_qdq(zoo.model, arm64, calib=zoo.calibration)
    lowered, applied = lower(qdq, arm64)
    assert applied["qlinear-conv"] == 2 and applied["conv-integer"] == 0
    reasons = near_miss_reasons(lowered, arm64)
    assert "onnxruntime's ConvInteger reads uint8 activations only" in reasons
    assert_matches_qdq(qdq, lowered, itertools.islice(read_batches(zoo.evaluation), 2))


def test_a_relu_before_a_q_whose_zero_point_is_not_the_minimum_stays():
    """``Q(Relu(y))`` equals ``Q(y)`` only when Q clamps at the Relu's 0, at zero point 0 for
    uint8; with another zero point the MatMul lowers alone and the Relu and Q stay."""
    qdq = compile_qdq(mlp(), "x86-avx2", calib=mlp_batches(4, seed=1))
    zero_point = qdq.graph.initializers["r_zero_point"]
    zero_point.const_value = ir.tensor(np.array(3, np.uint8), name=zero_point.name)
    reasons = near_miss_reasons(qdq, "x86-avx2")
    assert "a Relu sits between it and the Q, whose zero point is not the minimum" in reasons
    lowered, applied = lower(qdq, "x86-avx2")
    assert applied["qlinear-matmul"] == 0 and applied["matmul-integer-to-float"] == 1
    assert_matches_qdq(qdq, lowered, mlp_batches(2, seed=7))


def test_a_bias_at_another_scale_keeps_the_gemm_in_qdq_form():
    qdq = compile_qdq(mlp(), "x86-avx2", calib=mlp_batches(4, seed=1))
    scale = next(v for name, v in qdq.graph.initializers.items() if name.endswith("b_gemm_scale"))
    scale.const_value = ir.tensor(scale.const_value.numpy() * 2, name=scale.name)
    lowered, applied = lower(qdq, "x86-avx2")
    assert applied["qgemm"] == 0
    reasons = {
        m.reason for m in near_misses(lowered, compiled_rules(qgraph.get_target("x86-avx2")))
    }
    assert "its bias scale is not s_x * s_w" in reasons


def test_the_qoperator_format_runs_the_lower_pass_in_a_compile():
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=mlp_batches(4, seed=1), budget="none"),
        format=QuantFormat.QOPERATOR,
    )
    result = qgraph.compile_model(mlp(), "x86-avx2", options=options)
    assert "lower" in [record.name for record in result.records]
    assert {"QLinearMatMul", "QGemm"} <= set(op_counts(result.model))
    assert not qgraph.get_target("x86-avx2").check(result.model)
    default = compile_qdq(mlp(), "x86-avx2", calib=mlp_batches(4, seed=1))
    assert "QGemm" not in op_counts(default), "Q/DQ stays the CPU targets' default format"


def test_tensorrt_refuses_the_qoperator_format_by_name():
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=mlp_batches(4, seed=1)),
        format=QuantFormat.QOPERATOR,
    )
    with pytest.raises(LoweringUnavailableError, match="target tensorrt has no QOperator"):
        qgraph.compile_model(mlp(), "tensorrt", options=options)
