"""The TensorRT target's conformance rules: a conforming graph passes them all; each violating
graph breaks exactly one rule, which names the node and the tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.graph.traversal import KEEP_FLOAT_KEY
from qgraph.targets import get_target
from qgraph.targets.conformance import LOADABLE_RULES
from qgraph.targets.tensorrt_rules import TENSORRT_RULES

TENSORRT = get_target("tensorrt")
C, HW, K, N = 4, 6, 8, 5
RNG = np.random.default_rng(0)


def model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    """Float32 inputs and outputs ``{name: shape}``, initializers ``{name: array}``."""
    graph = helper.make_graph(
        nodes,
        "trt",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def weight(shape) -> np.ndarray:
    return RNG.integers(-127, 128, shape).astype(np.int8)


def activation_qdq(name: str, *, axis: int | None = None) -> list[onnx.NodeProto]:
    """``name -> QuantizeLinear -> DequantizeLinear -> name_dq``, per tensor unless ``axis``."""
    extra = {} if axis is None else {"axis": axis}
    scale, zero_point = f"{name}_scale", f"{name}_zero_point"
    return [
        helper.make_node(
            "QuantizeLinear", [name, scale, zero_point], [f"{name}_q"], name=f"{name}_Q", **extra
        ),
        helper.make_node(
            "DequantizeLinear",
            [f"{name}_q", scale, zero_point],
            [f"{name}_dq"],
            name=f"{name}_DQ",
            **extra,
        ),
    ]


def conv_block(
    op: str = "Conv",
    weight_axis: int | None = None,
    *,
    skip: str = "x_dq",
    quantize_output: bool = False,
    **initializers,
) -> onnx.ModelProto:
    """``x -> Q/DQ -> Conv(DQ(W) per channel, float bias) -> Add(skip) -> Relu``: a residual
    block as TensorRT wants it, with keyword overrides of any initializer."""
    axis = weight_axis if weight_axis is not None else (1 if op == "ConvTranspose" else 0)
    conv_output = "conv_out_dq" if quantize_output else "conv_out"
    nodes = [
        *activation_qdq("x"),
        helper.make_node(
            "DequantizeLinear", ["W", "W_scale", "W_zero_point"], ["W_dq"], name="W_DQ", axis=axis
        ),
        helper.make_node(op, ["x_dq", "W_dq", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        *(activation_qdq("conv_out") if quantize_output else []),
        helper.make_node("Add", [conv_output, skip], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu"),
    ]
    values = {
        "x_scale": np.float32(0.05),
        "x_zero_point": np.int8(0),
        "conv_out_scale": np.float32(0.1),
        "conv_out_zero_point": np.int8(0),
        "W": weight((C, C, 3, 3)),
        "W_scale": RNG.uniform(0.001, 0.01, C).astype(np.float32),
        "W_zero_point": np.zeros(C, np.int8),
        "B": RNG.standard_normal(C).astype(np.float32),
    }
    if not quantize_output:
        del values["conv_out_scale"], values["conv_out_zero_point"]
    values.update(initializers)
    shape = [1, C, HW, HW]
    return model(nodes, {"x": shape}, {"y": shape}, values)


def linear(op: str = "MatMul", weight_axis: int = 1, trans_b: int = 0) -> onnx.ModelProto:
    """``x[2, K] -> Q/DQ -> MatMul or Gemm(DQ(W) per channel along weight_axis)``."""
    shape = (N, K) if trans_b else (K, N)
    attributes = {"transB": trans_b} if op == "Gemm" else {}
    nodes = [
        *activation_qdq("x"),
        helper.make_node(
            "DequantizeLinear",
            ["W", "W_scale", "W_zero_point"],
            ["W_dq"],
            name="W_DQ",
            axis=weight_axis,
        ),
        helper.make_node(op, ["x_dq", "W_dq"], ["y"], name="linear", **attributes),
    ]
    values = {
        "x_scale": np.float32(0.05),
        "x_zero_point": np.int8(0),
        "W": weight(shape),
        "W_scale": RNG.uniform(0.001, 0.01, shape[weight_axis]).astype(np.float32),
        "W_zero_point": np.zeros(shape[weight_axis], np.int8),
    }
    return model(nodes, {"x": [2, K]}, {"y": [2, N]}, values)


def violations(proto: onnx.ModelProto):
    return TENSORRT.check(qgraph.load(proto))


def assert_breaks_only(proto: onnx.ModelProto, rule: str, node: str, tensor: str) -> None:
    """``proto`` breaks ``rule`` at ``node`` (the message naming ``tensor``), and no other rule."""
    found = violations(proto)
    assert {v.rule for v in found} == {rule}, found
    assert any(v.node == node and f"'{tensor}'" in v.message for v in found), found


def test_the_rules_follow_the_loadability_rules():
    assert TENSORRT.conformance_rules == LOADABLE_RULES + TENSORRT_RULES
    assert TENSORRT.describe()["conformance_rules"][-2:] == [
        "weighted_op_outputs_unquantized",
        "residual_inputs_quantized",
    ]


@pytest.mark.parametrize(
    "proto",
    [
        conv_block(),
        conv_block("ConvTranspose"),
        linear("MatMul", 1),
        linear("Gemm", 0, trans_b=1),
        linear("Gemm", 1, trans_b=0),
    ],
    ids=["conv-residual", "conv-transpose", "matmul", "gemm-transB", "gemm"],
)
def test_conforming_graphs_pass_every_rule_and_run(proto):
    assert violations(proto) == []
    onnx.checker.check_model(proto, full_check=True)
    (x,) = proto.graph.input
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32)}
    assert np.isfinite(verify.run(proto.SerializeToString(), feeds)["y"]).all()


@pytest.mark.parametrize(
    ("op", "inputs", "outputs"),
    [
        ("DynamicQuantizeLinear", {"x": TensorProto.FLOAT}, ["q", "s", "z"]),
        ("MatMulInteger", {"a": TensorProto.UINT8, "b": TensorProto.INT8}, ["y"]),
        ("ConvInteger", {"a": TensorProto.UINT8, "b": TensorProto.INT8}, ["y"]),
        (
            "QLinearMatMul",
            {
                "a": TensorProto.INT8,
                "a_scale": TensorProto.FLOAT,
                "a_zero_point": TensorProto.INT8,
                "b": TensorProto.INT8,
                "b_scale": TensorProto.FLOAT,
                "b_zero_point": TensorProto.INT8,
                "y_scale": TensorProto.FLOAT,
                "y_zero_point": TensorProto.INT8,
            },
            ["y"],
        ),
    ],
)
def test_rule_no_qoperator_ops(op, inputs, outputs):
    graph = helper.make_graph(
        [helper.make_node(op, list(inputs), outputs, name="integer_op")],
        "qoperator",
        [helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (violation,) = violations(proto)
    assert violation.rule == "no_qoperator_ops" and violation.node == "integer_op"
    assert op in violation.message


@pytest.mark.parametrize("op", ["DynamicQuantizeLSTM", "QOrderedMatMul", "GatherBlockQuantized"])
def test_rule_no_qoperator_ops_refuses_onnxruntimes_integer_contrib_ops(op):
    graph = helper.make_graph(
        [helper.make_node(op, ["a"], ["y"], name="integer_op", domain="com.microsoft")],
        "contrib",
        [helper.make_tensor_value_info("a", TensorProto.INT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    refused = [v for v in violations(proto) if v.rule == "no_qoperator_ops"]
    assert [v.node for v in refused] == ["integer_op"]


def test_rule_qdq_types_int8_refuses_uint8_activations():
    proto = conv_block(x_zero_point=np.uint8(0))
    assert_breaks_only(proto, "qdq_types_int8", "x_Q", "x")
    assert {v.node for v in violations(proto)} == {"x_Q", "x_DQ"}


def test_rule_qdq_types_int8_refuses_a_quantize_without_zero_point():
    proto = conv_block()
    quantize = next(n for n in proto.graph.node if n.name == "x_Q")
    del quantize.input[2]  # ONNX then quantizes to uint8
    (violation,) = violations(proto)
    assert violation.rule == "qdq_types_int8" and violation.node == "x_Q"
    assert "uint8 (it has no zero point)" in violation.message


def test_rule_qdq_types_int8_refuses_an_int32_bias():
    proto = conv_block(B_q=np.arange(C, dtype=np.int32), B_scale=np.float32(0.01))
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == "B"))
    proto.graph.node.insert(
        0, helper.make_node("DequantizeLinear", ["B_q", "B_scale"], ["B"], name="B_DQ")
    )
    assert_breaks_only(proto, "qdq_types_int8", "B_DQ", "B_q")


def test_rule_zero_points_zero():
    proto = conv_block(x_zero_point=np.int8(3))
    assert_breaks_only(proto, "zero_points_zero", "x_Q", "x_zero_point")
    assert "holds 3" in violations(proto)[0].message


@pytest.mark.parametrize("bad", [0.0, -0.05, np.inf, np.nan])
def test_rule_scales_positive(bad):
    assert_breaks_only(conv_block(x_scale=np.float32(bad)), "scales_positive", "x_DQ", "x_scale")
    scales = np.full(C, 0.01, np.float32)
    scales[2] = bad
    assert_breaks_only(conv_block(W_scale=scales), "scales_positive", "W_DQ", "W_scale")


def test_rule_activations_per_tensor():
    proto = conv_block(x_scale=np.full(C, 0.05, np.float32), x_zero_point=np.zeros(C, np.int8))
    for node in proto.graph.node:
        if node.name in ("x_Q", "x_DQ"):
            node.attribute.append(helper.make_attribute("axis", 1))
    assert_breaks_only(proto, "activations_per_tensor", "x_Q", "x")
    assert {v.node for v in violations(proto)} == {"x_Q", "x_DQ"}


@pytest.mark.parametrize(
    ("proto", "expected"),
    [
        (conv_block("Conv", 1), "axis 1; tensorrt wants its output-channel axis 0"),
        (conv_block("ConvTranspose", 0), "axis 0; tensorrt wants its output-channel axis 1"),
        (linear("MatMul", 0), "axis 0; tensorrt wants its output-channel axis 1"),
        (linear("Gemm", 1, trans_b=1), "axis 1; tensorrt wants its output-channel axis 0"),
        (linear("Gemm", 0, trans_b=0), "axis 0; tensorrt wants its output-channel axis 1"),
    ],
    ids=["conv", "conv-transpose", "matmul", "gemm-transB", "gemm"],
)
def test_rule_per_channel_weight_axes(proto, expected):
    assert_breaks_only(proto, "per_channel_weight_axes", "W_DQ", "W")
    assert expected in violations(proto)[0].message


def test_rule_per_channel_weight_axes_only_on_weights():
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["E", "E_scale", "E_zero_point"], ["E_dq"], name="E_DQ", axis=0
        ),
        helper.make_node("Gather", ["E_dq", "ids"], ["y"], name="embedding"),
    ]
    values = {
        "E": weight((K, N)),
        "E_scale": np.full(K, 0.01, np.float32),
        "E_zero_point": np.zeros(K, np.int8),
        "ids": np.array([1, 3], np.int64),
    }
    proto = model(nodes, {}, {"y": [2, N]}, values)
    assert_breaks_only(proto, "per_channel_weight_axes", "E_DQ", "E")
    assert "Gather 'embedding'" in violations(proto)[0].message


def test_rule_weighted_op_outputs_unquantized():
    proto = conv_block(quantize_output=True)
    assert_breaks_only(proto, "weighted_op_outputs_unquantized", "conv_out_Q", "conv_out")
    assert "Add 'residual'" in violations(proto)[0].message


def test_a_weighted_op_may_quantize_another_weighted_ops_output():
    proto = linear("MatMul", 1)
    proto.graph.node[-1].output[0] = "h"
    proto.graph.node.extend(
        [
            *activation_qdq("h"),
            helper.make_node("MatMul", ["h_dq", "W2_dq"], ["y"], name="second"),
            helper.make_node(
                "DequantizeLinear", ["W2", "W2_scale", "W2_zero_point"], ["W2_dq"], axis=1
            ),
        ]
    )
    extra = {
        "h_scale": np.float32(0.1),
        "h_zero_point": np.int8(0),
        "W2": weight((N, N)),
        "W2_scale": np.full(N, 0.01, np.float32),
        "W2_zero_point": np.zeros(N, np.int8),
    }
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in extra.items())
    assert violations(proto) == []


def test_rule_residual_inputs_quantized():
    assert_breaks_only(conv_block(skip="x"), "residual_inputs_quantized", "residual", "x")


def test_residual_rule_needs_an_int8_op_and_a_skip_input():
    float_conv = conv_block(skip="x")
    next(n for n in float_conv.graph.node if n.name == "conv").input[0] = "x"  # a float Conv
    assert violations(float_conv) == []
    two_branches = conv_block(skip="conv_out")  # Add(conv, conv): no skip input to quantize
    assert violations(two_branches) == []


def test_an_add_whose_skip_input_calibration_keeps_float_is_exempt():
    proto = conv_block(skip="x")
    residual = next(n for n in proto.graph.node if n.name == "residual")
    residual.metadata_props.add(key=KEEP_FLOAT_KEY, value="its skip input stays float: ...")
    assert violations(proto) == []


def test_a_residual_stream_too_wide_for_8_bits_compiles_with_its_matmul_in_int8():
    """An LLM's residual stream carries a few massive activations: calibration keeps the skip
    input float, so TensorRT runs the MatMul in int8 and the Add apart; the compile conforms
    instead of failing on its own residual rule."""
    rng = np.random.default_rng(4)
    proto = model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
            helper.make_node("Add", ["h", "stream"], ["y"], name="residual"),
        ],
        {"x": [16, K], "stream": [16, N]},
        {"y": [16, N]},
        {"W": rng.standard_normal((K, N)).astype(np.float32)},
    )
    batches = []
    for _ in range(4):
        stream = rng.standard_normal((16, N)).astype(np.float32)
        stream[0, 0] = 3e4  # one massive activation per batch, as in SmolLM2's stream
        batches.append({"x": rng.standard_normal((16, K)).astype(np.float32), "stream": stream})
    options = qgraph.CompileOptions(quantization=qgraph.quant_options(calib=batches, budget="none"))
    result = qgraph.compile_model(proto, "tensorrt", options=options)
    nodes = {node.name: node for node in result.model.graph}
    assert "dominated by a few values" in nodes["residual"].metadata_props[KEEP_FLOAT_KEY]
    assert {i.producer().op_type for i in nodes["proj"].inputs} == {"DequantizeLinear"}


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_is_quantized_along_its_output_channels(group):
    """ConvTranspose's weight is [C, M/group, kH, kW]: per channel on axis 1, ungrouped only.
    The compiled model passes TensorRT's rules and computes exactly the float ConvTranspose
    of its fake-quantized input and weight (symmetric int8, zero point 0), to float rounding."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 16 // group, 3, 3)) * 0.2).astype(np.float32)
    node = helper.make_node(
        "ConvTranspose", ["x", "W"], ["y"], name="up", group=group, strides=[2, 2]
    )
    proto = model([node], {"x": [1, 8, 6, 6]}, {"y": [1, 16, 13, 13]}, {"W": w})
    data = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(4)]
    options = qgraph.CompileOptions(quantization=qgraph.quant_options(calib=data, budget="none"))
    result = qgraph.compile_model(proto, "tensorrt", options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    if group > 1:
        assert "grouped ConvTranspose" in annotate.float_reasons["up"][1]
        return
    assert annotate.annotated["ConvTranspose"] == 1
    weight_dq = next(
        n
        for n in result.model.graph
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
    )
    assert weight_dq.attributes.get_int("axis") == 1
    assert weight_dq.inputs[1].const_value.shape == (16,)
    assert not TENSORRT.check(result.model)
    w_q, w_scale = (weight_dq.inputs[i].const_value.numpy() for i in (0, 1))
    x_q = next(n for n in result.model.graph if n.op_type == "QuantizeLinear")
    x_scale = float(x_q.inputs[1].const_value.numpy())
    x = data[0]["x"]
    x_fake = (np.clip(np.rint(x / x_scale), -128, 127) * x_scale).astype(np.float32)
    w_fake = (w_q.astype(np.float32) * w_scale[None, :, None, None]).astype(np.float32)
    reference = model([node], {"x": [1, 8, 6, 6]}, {"y": [1, 16, 13, 13]}, {"W": w_fake})
    expected = verify.run(qgraph.load(reference), {"x": x_fake})["y"]
    actual = verify.run(result.model, data[0])["y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(actual - verify.run(qgraph.load(proto), data[0])["y"]).max() > 0, "quantized"
