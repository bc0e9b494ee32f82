"""Annotate: which ops get a quantization spec, and the reason for each that stays float."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import qgraph


def test_a_matmul_inside_an_if_body_is_listed_float_with_its_reason():
    rng = np.random.default_rng(3)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")

    def branch(name: str, op: str, inputs: list[str]) -> onnx.GraphProto:
        nodes = [helper.make_node(op, inputs, [f"{name}_y"], name=f"{name}_op")]
        out = [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [4, 16])]
        return helper.make_graph(nodes, name, [], out)

    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["c"],
                ["y"],
                name="choose",
                then_branch=branch("then", "MatMul", ["x", "W"]),
                else_branch=branch("else", "Add", ["x", "x"]),
            )
        ],
        "branches",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = [{"x": rng.standard_normal((4, 16)).astype(np.float32), "c": np.array(True)}]
    options = qgraph.CompileOptions(quantization=qgraph.quant_options(calib=data, budget="none"))
    result = qgraph.compile_model(proto, "x86-vnni", options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    op, reason = annotate.float_reasons["then_op"]
    assert op == "MatMul" and "inside a subgraph of If 'choose'" in reason
    assert "else_op" not in annotate.float_reasons
