"""The runtime-check pass: quantized ops onnxruntime would run in float go back to float
weights, exactly; those it fuses stay; dynamic mode is lowered so that its groups fuse."""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.errors import ConformanceError
from qgraph.kernels import runtime_kernels
from qgraph.options import CompileOptions
from qgraph.passes.runtime_check import RuntimeCheckPass, dequantize_shape_problem
from qgraph.recipe import quant_options
from qgraph.targets import same_arch

RNG = np.random.default_rng(0)
W1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
W2 = (RNG.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
FC = (RNG.standard_normal((8, 5)) * 0.3).astype(np.float32)


def conv_silu() -> onnx.ModelProto:
    """Two Conv + SiLU (Sigmoid, Mul) blocks, a global pool and a MatMul: the shape of a
    YOLO-style backbone, where the activation sits between each Conv and the next Q."""
    nodes = []
    source = "x"
    for i, weight in enumerate(("W1", "W2")):
        nodes += [
            helper.make_node("Conv", [source, weight], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
            helper.make_node("Sigmoid", [f"c{i}"], [f"g{i}"], name=f"sigmoid{i}"),
            helper.make_node("Mul", [f"c{i}", f"g{i}"], [f"a{i}"], name=f"silu{i}"),
        ]
        source = f"a{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "FC"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(a, n) for n, a in (("W1", W1), ("W2", W2), ("FC", FC))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(count)]


def compiled(target="x86-vnni", **flags) -> qgraph.CompileResult:
    flags.setdefault("calib", batches())
    flags.setdefault("smoothquant", "none")
    flags.setdefault("budget", "none")
    options = CompileOptions(quantization=quant_options(**flags))
    return qgraph.compile_model(conv_silu(), target, options=options)


def details(result: qgraph.CompileResult, name: str):
    return next(r.details for r in result.records if r.name == name)


host_only = pytest.mark.skipif(
    not same_arch("x86_64", __import__("platform").machine()), reason="needs an x86-64 host"
)


@host_only
def test_every_conv_gets_a_q_on_its_output_and_runs_as_qlinearconv():
    result = compiled()
    kernels = runtime_kernels(result.model)
    assert kernels.quantized == 3 and kernels.complete, kernels.float_ops
    assert kernels.runtime_ops["com.microsoft::QLinearConv"] == 2
    assert details(result, "runtime-check").reverted == ()


@host_only
def test_ops_the_runtime_would_run_in_float_go_back_to_their_float_weights():
    vnni = qgraph.get_target("x86-vnni")
    no_output_q = dataclasses.replace(
        vnni, kernels=dataclasses.replace(vnni.kernels, output_quantized_ops=frozenset())
    )
    result = compiled(no_output_q)
    check = details(result, "runtime-check")
    assert sorted(op.name for op in check.reverted) == ["conv0", "conv1"]
    assert "2 more would have run in float" in check.summary()
    graph = result.model.graph
    assert "W1" in graph.initializers and "W2" in graph.initializers, "the float weights are back"
    convs = [n for n in graph if n.op_type == "Conv"]
    assert all(n.inputs[1].const_value is not None for n in convs), "no DQ in front of a Conv"
    assert runtime_kernels(result.model).complete
    # conv1 reads conv0's float output and conv0 reads x: the Convs compute in float32 exactly
    # as before, so only the MatMul's 8-bit error is left. The MatMul alone: its input and
    # weight each round by at most half a step, so |y - y'| <= K (|f| s_w + |W| s_f) / 2 + ...
    feeds = batches(1, seed=5)[0]
    reference = verify.run(conv_silu().SerializeToString(), feeds)["y"]
    actual = verify.run(result.model, feeds)["y"]
    fc_only = compiled(exclude_op=["Conv"])
    fc_only_y = verify.run(fc_only.model, feeds)["y"]
    np.testing.assert_allclose(actual, fc_only_y, rtol=0, atol=1e-5 * np.abs(reference).max())


@host_only
def test_4_bit_weights_the_runtime_has_no_kernel_for_are_a_warning(caplog):
    """A MatMul with 4-bit block weights and a static 8-bit activation matches no integer
    kernel: it goes back to float, and the user who asked for 4 bits is told, with the mode
    that runs them."""
    with caplog.at_level(logging.WARNING, logger="qgraph.passes.runtime_check"):
        result = compiled(weight_dtype="int4", block_size=16, exclude_op=["Conv"])
    assert [op.name for op in details(result, "runtime-check").reverted] == ["fc"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1 op asked for 4-bit weights")
    assert "'fc'" in warnings[0] and "--mode weight-only" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qgraph.passes.runtime_check"):
        compiled(exclude_op=["Conv"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@host_only
def test_the_qlinearconv_model_matches_its_qdq_reference_within_one_output_step():
    result = compiled()
    feeds = batches(1, seed=6)[0]
    fused = verify.run(result.model, feeds, optimize=True)["y"]
    qdq = verify.run(result.model, feeds, optimize=False)["y"]
    # QLinearConv requantizes its int32 sum once: the output lands at most one step s_y of
    # conv1 off the Q/DQ reference's; SiLU is 1.1-Lipschitz and the pool averages, so y moves
    # by at most 1.1 s_y |FC| summed over the 8 channels (plus float rounding).
    s_y = float(result.model.graph.initializers["c1_output_scale"].const_value.numpy())
    s_0 = float(result.model.graph.initializers["c0_output_scale"].const_value.numpy())
    bound = 1.1 * (s_y + s_0 * 1.1 * np.abs(W2).sum(axis=(1, 2, 3)).max()) * np.abs(FC).sum(0)
    assert np.all(np.abs(fused - qdq) <= bound + 1e-5)
    assert not np.array_equal(fused, qdq), "onnxruntime fused the groups: numbers moved"


@host_only
def test_dynamic_mode_lowers_matmuls_and_keeps_convs_float():
    result = compiled(mode="dynamic", calib=None)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("Conv") == 2
    annotate = details(result, "annotate")
    assert (
        annotate.unquantized[
            ("Conv", "target x86-vnni quantizes only Gemm, MatMul in dynamic mode")
        ]
        == 2
    )
    assert runtime_kernels(result.model).complete


def test_the_check_is_skipped_where_the_runtime_is_not_this_hosts():
    result = compiled("tensorrt")
    check = details(result, "runtime-check")
    assert check.kernels is None and "TensorrtExecutionProvider" in check.summary()


def test_same_arch_spells_each_architecture_both_ways():
    assert same_arch("x86_64", "AMD64") and same_arch("aarch64", "arm64")
    assert not same_arch("aarch64", "x86_64") and not same_arch(None, "x86_64")


def dequantize_matmul(
    values: np.ndarray, scale: np.ndarray, transposed: bool = False, **attributes
) -> ir.Model:
    """x [3, K] -> MatMul(DQ(values, scale, zero point 0)) with ``attributes``, ``values``
    read through a Transpose where ``transposed``."""
    weight = values.T if transposed else values
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            ["Wq_t" if transposed else "Wq", "s", "z"],
            ["w"],
            name="dq",
            **attributes,
        ),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    if transposed:
        nodes.insert(0, helper.make_node("Transpose", ["Wq"], ["Wq_t"], name="t", perm=[1, 0]))
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, weight.shape[1]])],
        [
            numpy_helper.from_array(values, "Wq"),
            numpy_helper.from_array(scale.astype(np.float32), "s"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), "z"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


Q8 = RNG.integers(-127, 128, (64, 24)).astype(np.int8)


@pytest.mark.parametrize(
    ("values", "scale", "transposed", "attributes"),
    [
        (Q8, np.ones(()), False, {}),
        (Q8, np.ones(24), False, {"axis": 1}),
        (Q8, np.ones((2, 24)), False, {"axis": 0, "block_size": 32}),
        (Q8, np.ones((3, 24)), False, {"axis": 0, "block_size": 24}),
        (Q8.T.copy(), np.ones((2, 24)), True, {"axis": 0, "block_size": 32}),
    ],
)
def test_dequantize_scales_that_fit_their_input_pass(values, scale, transposed, attributes):
    model = dequantize_matmul(values, scale, transposed, **attributes)
    node = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dequantize_shape_problem(node) is None


@pytest.mark.parametrize(
    ("values", "scale", "transposed", "attributes", "message"),
    [
        (Q8.T.copy(), np.ones((2, 24)), True, {"axis": 0}, "shape [2, 24] but no block_size"),
        (Q8, np.ones(64), False, {"axis": 1}, "input [64, 24] with axis 1 needs [24]"),
        (Q8, np.ones((4, 24)), False, {"axis": 0, "block_size": 32}, "needs [2, 24]"),
        (Q8.T.copy(), np.ones((24, 2)), True, {"axis": 0, "block_size": 32}, "needs [2, 24]"),
    ],
)
def test_the_check_refuses_a_dequantize_whose_scale_does_not_fit(
    values, scale, transposed, attributes, message
):
    """The tied lm_head's old form (a transposed 4-bit table, a 2-D scale, no block_size) among
    them; refused on any target, before onnxruntime is asked."""
    model = dequantize_matmul(values, scale, transposed, **attributes)
    with pytest.raises(
        ConformanceError, match=f"DequantizeLinear 'dq': scale 's' has .*{re.escape(message)}"
    ):
        RuntimeCheckPass(qgraph.get_target("tensorrt"))(model)


def test_a_zero_point_of_another_shape_than_its_scale_is_refused():
    model = dequantize_matmul(Q8, np.ones(24), axis=1)
    zero_point = model.graph.initializers["z"]
    zero_point.const_value = ir.tensor(np.zeros((1, 24), np.int8), name="z")
    node = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dequantize_shape_problem(node) == "zero point 'z' has shape [1, 24], not [24]"


MLP = [(RNG.standard_normal((16, 16)) * 0.3).astype(np.float32) for _ in range(3)]


def linear_relu_chain() -> onnx.ModelProto:
    """Three ``MatMul + Add`` layers with a Relu after the first two, as torch exports an MLP:
    fusion makes each layer a Gemm, and onnxruntime fuses a Gemm + Relu into a float
    ``FusedGemm`` unless a Q reads the Relu's output."""
    nodes, source = [], "x"
    for i in range(3):
        nodes += [
            helper.make_node("MatMul", [source, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"l{i}"], name=f"add{i}"),
        ]
        source = f"l{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [source], [f"r{i}"], name=f"relu{i}"))
            source = f"r{i}"
    nodes.append(helper.make_node("Identity", [source], ["y"], name="out"))
    weights = [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(MLP)]
    biases = [numpy_helper.from_array(np.full(16, 0.1, np.float32), f"b{i}") for i in range(3)]
    graph = helper.make_graph(
        nodes,
        "linear_relu_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        weights + biases,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def compiled_chain(target: qgraph.TargetSpec) -> qgraph.CompileResult:
    """The chain with its last layer kept in float, so the second Relu feeds a float Gemm."""
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    flags = {"calib": calib, "smoothquant": "none", "budget": "none", "exclude_node": ["mm2"]}
    options = CompileOptions(quantization=quant_options(**flags))
    return qgraph.compile_model(linear_relu_chain(), target, options=options)


@host_only
def test_a_gemm_whose_relu_feeds_a_float_op_gets_a_q_on_its_output_and_runs_as_qgemm():
    result = compiled_chain(qgraph.get_target("x86-vnni"))
    kernels = runtime_kernels(result.model)
    assert kernels.quantized == 2 and kernels.complete, kernels.float_ops
    assert kernels.runtime_ops["com.microsoft::QGemm"] == 2
    assert details(result, "runtime-check").reverted == ()


@host_only
def test_putting_an_op_back_in_float_asks_the_runtime_again_about_its_neighbours():
    # Without the Q after the second Relu, the second Gemm runs as a float FusedGemm; putting
    # it back drops the Q/DQ between the layers, so the first Gemm's Relu then feeds a float
    # op and the first Gemm turns into a FusedGemm too: a second round puts it back.
    vnni = qgraph.get_target("x86-vnni")
    unaware = dataclasses.replace(
        vnni, kernels=dataclasses.replace(vnni.kernels, output_quantized_chains=())
    )
    result = compiled_chain(unaware)
    check = details(result, "runtime-check")
    assert sorted(op.name for op in check.reverted) == ["node_Gemm_0", "node_Gemm_1"]
    assert runtime_kernels(result.model).complete
    assert not any(n.op_type == "DequantizeLinear" for n in result.model.graph)
    # Every layer is float again, reading its own weights: the float function, to float32
    # rounding (Gemm against MatMul + Add).
    feeds = {"x": np.random.default_rng(4).standard_normal((4, 16)).astype(np.float32)}
    reference = verify.run(linear_relu_chain().SerializeToString(), feeds)["y"]
    actual = verify.run(result.model, feeds)["y"]
    np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
