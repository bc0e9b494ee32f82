"""MatMul + Add and Gemm, each target getting the form it prefers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (3, 1), (3, 5), ()])
def test_two_d_matmul_add_becomes_gemm(make_model, fuse, ops, bias_shape):
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["c", "h"], ["y"])],
        {"x": [3, 4]},
        {"y": [3, 5]},
        {
            "W": RNG.normal(size=(4, 5)).astype(np.float32),
            "c": RNG.normal(size=bias_shape).astype(np.float32),
        },
    )
    model, report = fuse(proto)
    assert ops(model) == ["Gemm"] and report.applied["matmul-add-to-gemm"] == 1


def test_not_a_gemm(make_model, fuse, ops, reasons):
    rank3 = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])],
        {"x": [2, 3, 4]},
        {"y": [2, 3, 5]},
        {"W": RNG.normal(size=(4, 5)).astype(np.float32), "c": np.ones(5, np.float32)},
    )
    model, report = fuse(rank3)
    assert ops(model) == ["MatMul", "Add"] and reasons(report, "matmul-add-to-gemm") == []
    widening = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])],
        {"x": [3, 4]},
        {"y": [2, 3, 5]},
        {"W": RNG.normal(size=(4, 5)).astype(np.float32), "c": np.ones((2, 3, 5), np.float32)},
    )
    model, report = fuse(widening)
    assert ops(model) == ["MatMul", "Add"]
    assert "widens the product" in reasons(report, "matmul-add-to-gemm")[0]


def test_tensorrt_gets_matmul_add_with_transposed_weights(make_model, fuse, ops):
    weights = {"B": RNG.normal(size=(5, 4)).astype(np.float32), "C": np.ones(5, np.float32)}
    proto = make_model(
        [helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1)],
        {"x": [3, 4]},
        {"y": [3, 5]},
        weights,
    )
    model, _ = fuse(proto, target="tensorrt")
    assert ops(model) == ["MatMul", "Add"]
    weight = model.graph.node(0).inputs[1]
    np.testing.assert_array_equal(weight.const_value.numpy(), weights["B"].T)
    model, _ = fuse(proto)
    assert ops(model) == ["Gemm"], "x86 keeps it"


def test_tensorrt_shared_weights_get_a_transpose_and_alpha_stays_a_gemm(
    make_model, fuse, ops, reasons
):
    weights = {"B": RNG.normal(size=(4, 4)).astype(np.float32)}
    shared = make_model(
        [
            helper.make_node("Gemm", ["x", "B"], ["h"], transB=1),
            helper.make_node("MatMul", ["h", "B"], ["y"]),
        ],
        {"x": [3, 4]},
        {"y": [3, 4]},
        weights,
    )
    model, _ = fuse(shared, target="tensorrt")
    assert ops(model) == ["Transpose", "MatMul", "MatMul"]
    scaled = make_model(
        [helper.make_node("Gemm", ["x", "B"], ["y"], alpha=2.0)],
        {"x": [3, 4]},
        {"y": [3, 4]},
        weights,
    )
    model, report = fuse(scaled, target="tensorrt")
    assert ops(model) == ["Gemm"] and reasons(report, "gemm-to-matmul-add") == [
        "alpha or beta is not 1"
    ]
