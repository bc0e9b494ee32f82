"""A max over axes of an activation becomes the activation of the extremes: only where the
activation's shape allows it and a bias is the same along the reduced axes.

The data make the min branch matter: channels whose values are all below GELU's minimum
(about -0.75) take their max GELU at their smallest value, which the max alone would miss by
up to 0.17.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(3)
N, C, L = 2, 6, 9


def reduction_model(nodes, y_shape, initializers=(), opset=17):
    graph = helper.make_graph(
        nodes,
        "max-of-activation",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, C, L])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, y_shape)],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def feeds() -> dict[str, np.ndarray]:
    y = RNG.standard_normal((N, C, L)).astype(np.float32)
    y[:, : C // 2] -= 4.0  # every value of these channels below GELU's minimum
    return {"y": y}


def bias(shape) -> numpy_helper.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), "b")


def test_a_global_max_of_a_biased_gelu_runs_on_the_extremes(fuse, ops):
    proto = reduction_model(
        [
            helper.make_node("Add", ["y", "b"], ["biased"]),
            helper.make_node("FastGelu", ["biased"], ["act"], domain="com.microsoft"),
            helper.make_node("GlobalMaxPool", ["act"], ["out"]),
        ],
        [N, C, 1],
        [bias((1, C, 1))],
    )
    model, report = fuse(proto, feeds=feeds(), rtol=0)
    assert report.applied["max-of-activation"] == 1
    gelu = "com.microsoft::FastGelu"
    assert sorted(ops(model)) == sorted(["ReduceMax", "ReduceMin", "Add", "Add", gelu, gelu, "Max"])


@pytest.mark.parametrize("opset", [17, 18])
def test_a_nondecreasing_activation_needs_only_the_max(fuse, ops, opset):
    axes = [helper.make_node("Constant", [], ["axes"], value_ints=[2])] if opset >= 18 else []
    reduce = (
        helper.make_node("ReduceMax", ["act", "axes"], ["out"], keepdims=0)
        if opset >= 18
        else helper.make_node("ReduceMax", ["act"], ["out"], axes=[2], keepdims=0)
    )
    proto = reduction_model(
        [
            *axes,
            helper.make_node("Add", ["y", "b"], ["biased"]),
            helper.make_node("Relu", ["biased"], ["act"]),
            reduce,
        ],
        [N, C],
        [bias((C, 1))],
        opset,
    )
    model, report = fuse(proto, feeds=feeds(), rtol=0)
    assert report.applied["max-of-activation"] == 1
    assert [op for op in ops(model) if op != "Constant"] == ["ReduceMax", "Add", "Relu"]


def test_a_bias_that_varies_along_the_reduced_axis_stays_before_the_max(fuse, ops):
    proto = reduction_model(
        [
            helper.make_node("Add", ["y", "b"], ["biased"]),
            helper.make_node("Gelu", ["biased"], ["act"], domain="com.microsoft"),
            helper.make_node("GlobalMaxPool", ["act"], ["out"]),
        ],
        [N, C, 1],
        [bias((1, 1, L))],
    )
    model, report = fuse(proto, feeds=feeds(), rtol=0)
    assert report.applied["max-of-activation"] == 1, "the GELU alone moves past the max"
    assert ops(model)[0] == "Add", "the bias is added to every element, then the extremes taken"


def test_an_activation_read_elsewhere_is_left_alone(fuse, ops):
    proto = reduction_model(
        [
            helper.make_node("Sigmoid", ["y"], ["act"]),
            helper.make_node("GlobalMaxPool", ["act"], ["pooled"]),
            helper.make_node("Add", ["act", "pooled"], ["out"]),
        ],
        [N, C, L],
    )
    model, report = fuse(proto, feeds=feeds())
    assert report.applied["max-of-activation"] == 0
    assert "GlobalMaxPool" in ops(model)
