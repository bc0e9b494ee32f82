"""Folding BatchNormalization into the op before it, and leaving it where it must stay."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

RNG = np.random.default_rng(0)


def _bn_params(channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": RNG.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": RNG.normal(0, 0.1, channels).astype(np.float32),
        "mean": RNG.normal(0, 0.1, channels).astype(np.float32),
        "var": RNG.uniform(0.5, 1.5, channels).astype(np.float32),
    }


def _bn(inp: str) -> helper.NodeProto:
    return helper.make_node(
        "BatchNormalization", [inp, "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 4])
def test_conv(make_model, fuse, ops, bias, group):
    weights = {"W": RNG.normal(size=(8, 8 // group, 3, 3)).astype(np.float32), **_bn_params(8)}
    inputs = ["x", "W"]
    if bias:
        weights["b"] = RNG.normal(size=8).astype(np.float32)
        inputs.append("b")
    proto = make_model(
        [helper.make_node("Conv", inputs, ["h"], pads=[1, 1, 1, 1], group=group), _bn("h")],
        {"x": [2, 8, 5, 5]},
        {"y": [2, 8, 5, 5]},
        weights,
    )
    model, report = fuse(proto)
    assert ops(model) == ["Conv"] and report.applied["fold-batchnorm"] == 1


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(make_model, fuse, ops, group):
    weights = {"W": RNG.normal(size=(4, 6 // group, 3, 3)).astype(np.float32), **_bn_params(6)}
    proto = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "W"], ["h"], strides=[2, 2], group=group),
            _bn("h"),
        ],
        {"x": [1, 4, 3, 3]},
        {"y": [1, 6, 7, 7]},
        weights,
    )
    model, _ = fuse(proto)
    assert ops(model) == ["ConvTranspose"]


@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm(make_model, fuse, ops, trans_b, alpha, beta):
    shape = (5, 4) if trans_b else (4, 5)
    weights = {
        "B": RNG.normal(size=shape).astype(np.float32),
        "C": RNG.normal(size=5).astype(np.float32),
        **_bn_params(5),
    }
    proto = make_model(
        [
            helper.make_node(
                "Gemm", ["x", "B", "C"], ["h"], transB=trans_b, alpha=alpha, beta=beta
            ),
            _bn("h"),
        ],
        {"x": [3, 4]},
        {"y": [3, 5]},
        weights,
    )
    model, _ = fuse(proto)
    assert ops(model) == ["Gemm"]
    assert model.graph.node(0).attributes.get_float("beta", 1.0) == 1.0


def test_rank_two_matmul_gets_an_add(make_model, fuse, ops):
    weights = {"W": RNG.normal(size=(4, 5)).astype(np.float32), **_bn_params(5)}
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), _bn("h")],
        {"x": [3, 4]},
        {"y": [3, 5]},
        weights,
    )
    model, _ = fuse(proto)
    assert ops(model) == ["Gemm"], "x86 then prefers the MatMul + Add as a Gemm"
    model, _ = fuse(proto, target="tensorrt")
    assert ops(model) == ["MatMul", "Add"]


def test_batchnorm_that_must_stay(make_model, fuse, ops, reasons):
    weights = {"W": RNG.normal(size=(4, 4, 1, 1)).astype(np.float32), **_bn_params(4)}
    shared = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["h"]),
            _bn("h"),
            helper.make_node("Conv", ["x", "W"], ["z"]),
            helper.make_node("Add", ["y", "z"], ["out"]),
        ],
        {"x": [1, 4, 3, 3]},
        {"out": [1, 4, 3, 3]},
        weights,
    )
    model, report = fuse(shared)
    assert "BatchNormalization" in ops(model)
    assert any("shared with" in r and "untie" in r for r in reasons(report, "fold-batchnorm"))

    weights.pop("W")
    dynamic = make_model(
        [helper.make_node("Conv", ["x", "W"], ["h"]), _bn("h")],
        {"x": [1, 4, 3, 3], "W": [4, 4, 1, 1]},
        {"y": [1, 4, 3, 3]},
        weights,
    )
    model, report = fuse(dynamic)
    assert "BatchNormalization" in ops(model)
    assert any("not a constant" in r for r in reasons(report, "fold-batchnorm"))

    after_relu = make_model(
        [helper.make_node("Relu", ["x"], ["h"]), _bn("h")],
        {"x": [1, 4, 3, 3]},
        {"y": [1, 4, 3, 3]},
        weights,
    )
    _, report = fuse(after_relu)
    assert reasons(report, "fold-batchnorm") == [
        "its input comes from Relu, not Conv/ConvTranspose/Gemm/MatMul"
    ]


def test_matmul_of_rank_three_is_not_folded(make_model, fuse, ops, reasons):
    weights = {"W": RNG.normal(size=(4, 5)).astype(np.float32), **_bn_params(3)}
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), _bn("h")],
        {"x": [2, 3, 4]},
        {"y": [2, 3, 5]},
        weights,
    )
    model, report = fuse(proto)
    assert ops(model) == ["MatMul", "BatchNormalization"]
    assert "is not rank 2" in reasons(report, "fold-batchnorm")[0]
