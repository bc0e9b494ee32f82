"""qgraph.inspection: counts a person would check, on a hand-built Q/DQ model."""

from __future__ import annotations

import numpy as np
from onnx import helper

import qgraph
from qgraph.inspection import diff_models


def _qdq_model(make_model):
    """x -Q-DQ-> MatMul(DQ(W_int8)) -> Relu, plus a QOperator MatMulInteger branch."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["h"], name="matmul"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["yi"], name="mmi"),
    ]
    initializers = {
        "xs": np.array(0.1, np.float32),
        "xz": np.array(128, np.uint8),
        "wq": np.ones((4, 3), np.int8),
        "ws": np.full(3, 0.05, np.float32),
    }
    model = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, initializers, opset=21)
    model.graph.output.append(helper.make_tensor_value_info("yi", 6, [2, 3]))
    return model


def test_summary_counts_ops_qdq_and_quantized_ops(make_model):
    summary = qgraph.summarize(qgraph.load(_qdq_model(make_model)))
    assert summary.nodes == 6
    assert summary.op_histogram == {
        "DequantizeLinear": 2,
        "QuantizeLinear": 1,
        "MatMul": 1,
        "Relu": 1,
        "MatMulInteger": 1,
    }
    assert (summary.quantize_nodes, summary.dequantize_nodes) == (1, 2)
    assert summary.quantized_ops == {"MatMul": 1, "MatMulInteger": 1}


def test_parameters_are_counted_by_dtype_without_reading_data(make_model):
    summary = qgraph.summarize(qgraph.load(_qdq_model(make_model)))
    by_dtype = {p.dtype: (p.tensors, p.elements, p.bytes) for p in summary.parameters}
    assert by_dtype == {"float": (2, 4, 16), "int8": (1, 12, 12), "uint8": (1, 1, 1)}
    assert summary.parameter_count == 17 and summary.parameter_bytes == 29


def test_interface_lists_shapes_and_leaves_out_initializers(make_model):
    proto = _qdq_model(make_model)
    proto.graph.input.append(helper.make_tensor_value_info("xs", 1, []))
    summary = qgraph.summarize(qgraph.load(proto))
    assert [(i.name, i.dtype, i.shape) for i in summary.inputs] == [("x", "float", [2, 4])]
    assert [o.name for o in summary.outputs] == ["y", "yi"]
    assert summary.opsets == {"ai.onnx": 21}


def test_json_summary_is_plain_data(make_model):
    import json

    data = qgraph.summarize(qgraph.load(_qdq_model(make_model))).to_json()
    assert json.loads(json.dumps(data))["parameter_bytes"] == 29


def test_contrib_ops_are_keyed_by_domain(make_model):
    proto = make_model(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        {"x": [2]},
        {"y": [2]},
        extra_opsets={"com.microsoft": 1},
    )
    assert qgraph.summarize(qgraph.load(proto)).op_histogram == {"com.microsoft::Gelu": 1}


def test_onnxruntimes_block_quantized_gather_counts_as_a_quantized_op(make_model):
    proto = make_model(
        [
            helper.make_node(
                "GatherBlockQuantized", ["table", "ids", "scales"], ["y"], domain="com.microsoft"
            )
        ],
        {"ids": [2]},
        {"y": [2, 32]},
        {
            "table": np.zeros((8, 32), np.uint8),
            "scales": np.ones((8, 1), np.float32),
        },
        extra_opsets={"com.microsoft": 1},
    )
    summary = qgraph.summarize(qgraph.load(proto))
    assert summary.quantized_ops == {"com.microsoft::GatherBlockQuantized": 1}


def _gelu_mlp(make_model):
    """x [4, 8] -> MatMul(W [8, 8]) -> erf GELU -> MatMul(V [8, 8]) -> y."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="up"),
        helper.make_node("Div", ["h", "root"], ["s"], name="div"),
        helper.make_node("Erf", ["s"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["p"], name="add"),
        helper.make_node("Mul", ["half", "h"], ["hh"], name="half_mul"),
        helper.make_node("Mul", ["hh", "p"], ["g"], name="mul"),
        helper.make_node("MatMul", ["g", "V"], ["y"], name="down"),
    ]
    initializers = {
        "W": rng.standard_normal((8, 8)).astype(np.float32),
        "V": rng.standard_normal((8, 8)).astype(np.float32),
        "root": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    return make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, initializers)


def test_a_diff_counts_what_the_compile_did(make_model):
    proto = _gelu_mlp(make_model)
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(2)]
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=calibration, budget="none")
    )
    compiled = qgraph.compile_model(proto, "x86-avx2", options=options).model
    diff = diff_models(qgraph.load(proto), compiled)
    changes = {change.op: (change.before, change.after) for change in diff.ops}
    assert changes["Erf"] == (1, 0) and "MatMul" not in changes
    assert changes["QuantizeLinear"] == (0, 2) and changes["DequantizeLinear"] == (0, 4)
    assert diff.created_by_pass["insert-qdq"] == {"DequantizeLinear": 4, "QuantizeLinear": 2}
    assert diff.created_by_pass["fusion"] == {"com.microsoft::Gelu": 1}
    assert diff.after.quantized_ops == {"MatMul": 2}
    assert diff.quantized_tensors == {
        ("weight", "int8 per-channel(axis 1)"): 2,
        ("activation", "uint8 per-tensor"): 2,
    }
    # two 8 x 8 float32 weights (512 B) become int8 (128 B) with a float scale and an int8
    # zero point per channel (96 B); the 3 scalars and the 2 activations' pairs (10 B) remain
    assert diff.before.parameter_bytes == 512 + 12
    assert diff.after.parameter_bytes == 128 + 2 * 8 * (4 + 1) + 2 * (4 + 1)
