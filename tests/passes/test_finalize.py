"""qgraph.passes.finalize: cleanup keeps the function; the checks fail loudly and precisely."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import qgraph
from qgraph import verify
from qgraph.errors import ConformanceError
from qgraph.passes.finalize import OnnxCheckerPass, TargetConformancePass, remove_unused
from qgraph.targets import get_target
from qgraph.targets.runtime import ORT_LIMITS


def test_checker_failure_names_the_problem(make_model):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {"y": [2]})
    model = qgraph.load(proto)
    model.graph.node(0).replace_input_with(0, ir.Value(name="ghost"))
    with pytest.raises(ConformanceError, match=r"fails the ONNX checker.*ghost"):
        OnnxCheckerPass()(model)


def test_conformance_lists_each_broken_rule(make_model):
    proto = make_model(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="gelu")],
        {"x": [2]},
        {"y": [2]},
        opset=ORT_LIMITS.max_opset + 1,
        extra_opsets={"com.microsoft": 1},
    )
    with pytest.raises(ConformanceError) as error:
        TargetConformancePass(get_target("tensorrt"))(qgraph.load(proto))
    message = str(error.value)
    assert "target 'tensorrt'" in message
    assert "opset_loadable" in message and "domains_supported" in message and "'gelu'" in message
    rules = {v.rule for v in get_target("x86-avx2").check(qgraph.load(proto))}
    assert "opset_loadable" in rules and "domains_supported" not in rules


def test_remove_unused_drops_dead_nodes_and_unused_opsets(make_model):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"])],
        {"x": [2]},
        {"y": [2]},
        extra_opsets={"com.microsoft": 1},
    )
    model = remove_unused()(qgraph.load(proto)).model
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert "com.microsoft" not in model.opset_imports


def test_finalize_sorts_nodes_and_names_them(make_model):
    proto = make_model(
        [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])],
        {"x": [2]},
        {"y": [2]},
    )
    x = {"x": np.array([-1.0, 2.0], np.float32)}
    model = qgraph.build_pipeline("x86-avx2").run(qgraph.load(proto)).model
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]
    assert all(n.name for n in model.graph)
    np.testing.assert_array_equal(verify.run(model, x)["y"], [0.0, -2.0])
