"""Rule tables: a rewritten node remembers the input model's nodes it replaces, so metadata
and exclusions by input name survive fusion."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph.graph.traversal import source_names

RNG = np.random.default_rng(0)
SCOPES = "pkg.torch.onnx.name_scopes"


def matmul_add() -> onnx.ModelProto:
    """``mm1`` then its bias ``add1``, which fusion turns into one Gemm."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b"], ["y"], name="add1"),
    ]
    scope = nodes[1].metadata_props.add()
    scope.key, scope.value = SCOPES, '["", "encoder.dense"]'
    graph = helper.make_graph(
        nodes,
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        [
            numpy_helper.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "W"),
            numpy_helper.from_array(RNG.standard_normal(64).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def compiled(**flags) -> qgraph.CompileResult:
    calibration = [{"x": RNG.standard_normal((8, 64)).astype(np.float32)}]
    quantization = qgraph.quant_options(calib=calibration, budget="none", **flags)
    options = qgraph.CompileOptions(quantization=quantization)
    return qgraph.compile_model(matmul_add(), "x86-vnni", options=options)


def gemm(result: qgraph.CompileResult):
    return next(node for node in result.model.graph if node.op_type == "Gemm")


def test_a_fused_node_keeps_its_sources_names_and_the_roots_metadata():
    fused = gemm(compiled())
    assert sorted(source_names(fused)) == ["add1", "mm1"]
    assert fused.metadata_props[SCOPES] == '["", "encoder.dense"]'


def test_excluding_a_node_by_its_input_name_keeps_the_fused_op_float():
    assert gemm(compiled()).inputs[0].producer().op_type == "DequantizeLinear"
    kept = gemm(compiled(exclude_node=("mm1",)))
    assert all(
        v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in kept.inputs
    )
