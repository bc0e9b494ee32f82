"""Annotate: which ops get a quantization spec, and the reason for each that stays float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qgraph
from qgraph.passes.annotate import (
    AnnotatePass,
    KeepFloat,
    NodeAnnotation,
    ResidualAnnotation,
    annotation,
    take_annotation,
)
from qgraph.passes.qdq import InsertQDQPass


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


def _matmul(weight: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def _annotator(**flags) -> AnnotatePass:
    options = qgraph.quant_options(mode="dynamic", **flags)
    return AnnotatePass(qgraph.get_target("x86-vnni"), options)


def test_decide_gives_an_annotation_or_a_typed_reason_to_keep_float():
    model = _matmul(np.ones((4, 4), np.float32))
    (node,) = model.graph
    decision = _annotator().decide(node)
    assert isinstance(decision, NodeAnnotation) and decision.weight == 1
    assert _annotator(exclude_op=("MatMul",)).decide(node) == KeepFloat(
        "op type MatMul excluded by the user"
    )
    assert _annotator().decide(ir.node("Relu", [node.outputs[0]])) is None


def test_annotations_are_handed_over_by_kind_and_taken_once():
    model = _matmul(np.ones((4, 4), np.float32))
    _annotator()(model)
    (node,) = model.graph
    assert annotation(node, ResidualAnnotation) is None
    taken = take_annotation(node, NodeAnnotation)
    assert isinstance(taken, NodeAnnotation) and annotation(node, NodeAnnotation) is None


def test_insert_qdq_refuses_a_node_handed_something_that_is_no_annotation():
    model = _matmul(np.ones((4, 4), np.float32))
    (node,) = model.graph
    node.meta["qgraph.annotation"] = {"weight": 1}
    options = qgraph.quant_options(mode="dynamic")
    insert = InsertQDQPass(qgraph.get_target("x86-vnni"), options)
    with pytest.raises(ir.passes.PreconditionError, match="node 'mm' carries dict"):
        insert(model)
