"""The runtime check reads onnxruntime's optimized graph: integer kernels where its QDQ
transformers fused a group, float ops (and the DequantizeLinear that feeds them) where not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph.kernels import is_qdq_group, runtime_kernels

RNG = np.random.default_rng(0)
W = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)


def conv_group(with_output_q: bool):
    """DQ(x), DQ(W) -> Conv -> [Q -> DQ ->] Sigmoid: onnxruntime fuses the Conv only with
    the Q after it."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], name="W_DQ", axis=0),
        helper.make_node("Conv", ["xd", "Wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    if with_output_q:
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="c_Q"),
            helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="c_DQ"),
            helper.make_node("Sigmoid", ["cd"], ["y"], name="sigmoid"),
        ]
    else:
        nodes.append(helper.make_node("Sigmoid", ["c"], ["y"], name="sigmoid"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
            numpy_helper.from_array(W, "Wq"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw"),
            numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def test_a_conv_with_a_q_after_it_runs_as_qlinearconv():
    report = runtime_kernels(conv_group(with_output_q=True))
    assert report.quantized == 1 and report.complete
    assert report.runtime_ops.get("com.microsoft::QLinearConv") == 1
    assert report.summary().startswith("1 of 1 quantized ops run as integer kernels")


def test_a_conv_without_a_q_after_it_runs_in_float_with_its_weight_dequantized():
    report = runtime_kernels(conv_group(with_output_q=False))
    assert report.quantized == 1 and report.integer == 0
    (op,) = report.float_ops
    assert op.name == "conv" and op.op_type == "Conv"
    assert "QLinearConv" not in str(report.runtime_ops)
    assert "dequantizing its inputs on every run" in op.reason


def test_only_weighted_ops_and_integer_operators_count_as_quantized():
    model = conv_group(with_output_q=True)
    assert [n.name for n in model.graph if is_qdq_group(n)] == ["conv"]
