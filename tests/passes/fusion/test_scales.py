"""Constant scales fold into neighbouring weights; layout chains collapse; the rest stays."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

RNG = np.random.default_rng(4)


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("c_shape", [(), (5,), (1, 5)])
def test_scale_after_matmul(make_model, fuse, ops, op, c_shape):
    c = RNG.uniform(0.5, 2.0, c_shape).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node(op, ["h", "c"], ["y"])],
        {"x": [2, 3, 4]},
        {"y": [2, 3, 5]},
        {"W": RNG.normal(size=(4, 5)).astype(np.float32), "c": c},
    )
    model, _ = fuse(proto)
    assert ops(model) == ["MatMul"]


@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_scale_before_matmul(make_model, fuse, ops, op):
    proto = make_model(
        [helper.make_node(op, ["x", "c"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["y"])],
        {"x": [2, 3, 4]},
        {"y": [2, 3, 5]},
        {
            "W": RNG.normal(size=(4, 5)).astype(np.float32),
            "c": RNG.uniform(0.5, 2.0, 4).astype(np.float32),
        },
    )
    model, _ = fuse(proto)
    assert ops(model) == ["MatMul"]


def test_scales_around_conv(make_model, fuse, ops):
    weights = {
        "W": RNG.normal(size=(6, 4, 3, 3)).astype(np.float32),
        "b": RNG.normal(size=6).astype(np.float32),
        "after": RNG.uniform(0.5, 2, (6, 1, 1)).astype(np.float32),
        "before": RNG.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32),
    }
    proto = make_model(
        [
            helper.make_node("Mul", ["x", "before"], ["s"]),
            helper.make_node("Conv", ["s", "W", "b"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Div", ["h", "after"], ["y"]),
        ],
        {"x": [1, 4, 5, 5]},
        {"y": [1, 6, 5, 5]},
        weights,
    )
    model, report = fuse(proto)
    assert ops(model) == ["Conv"]
    assert report.applied["scale-before-conv"] == report.applied["scale-after-conv"] == 1


def test_scales_that_must_stay(make_model, fuse, ops, reasons):
    w = RNG.normal(size=(4, 5)).astype(np.float32)
    widening = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "c"], ["y"])],
        {"x": [3, 4]},
        {"y": [2, 3, 5]},
        {"W": w, "c": np.ones((2, 1, 5), np.float32)},
    )
    model, report = fuse(widening)
    assert "Mul" in ops(model) and "does not scale only" in reasons(report, "scale-after-matmul")[0]
    zeros = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Div", ["h", "c"], ["y"])],
        {"x": [3, 4]},
        {"y": [3, 5]},
        {"W": w, "c": np.array([1, 2, 0, 1, 1], np.float32)},
    )
    proto_feeds = {"x": RNG.standard_normal((3, 4), dtype=np.float32)}
    model, report = fuse(zeros, feeds=proto_feeds)
    assert "Div" in ops(model) and reasons(report, "scale-after-matmul") == [
        "divisor 'c' has zeros"
    ]
    shared = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Mul", ["h", "c"], ["y"]),
            helper.make_node("MatMul", ["x", "W"], ["z"]),
        ],
        {"x": [3, 4]},
        {"y": [3, 5], "z": [3, 5]},
        {"W": w, "c": np.array(2.0, np.float32)},
    )
    model, report = fuse(shared)
    assert "Mul" in ops(model) and "shared with" in reasons(report, "scale-after-matmul")[0]
    activations = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Mul", ["h", "x2"], ["y"]),
        ],
        {"x": [3, 4], "x2": [3, 5]},
        {"y": [3, 5]},
        {"W": w},
    )
    _, report = fuse(activations)
    assert reasons(report, "scale-after-matmul") == [], (
        "a product of two activations is no near-miss"
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ([1, 0, 2], [1, 0, 2], []),
        ([0, 2, 1], [2, 0, 1], ["Transpose"]),
    ],
)
def test_transpose_chains(make_model, fuse, ops, first, second, expected):
    proto = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=first),
            helper.make_node("Transpose", ["t"], ["t2"], perm=second),
            helper.make_node("Relu", ["t2"], ["y"]),
        ],
        {"x": [2, 3, 4]},
        {"y": None},
    )
    model, _ = fuse(proto)
    assert ops(model) == [*expected, "Relu"]


def test_reshape_chains(make_model, fuse, ops, reasons):
    shapes = {
        "s1": np.array([6, 4], np.int64),
        "s2": np.array([-1, 2], np.int64),
        "s0": np.array([0, -1], np.int64),
    }
    proto = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        {"x": [2, 3, 4]},
        {"y": [12, 2]},
        shapes,
    )
    model, _ = fuse(proto)
    assert ops(model) == ["Reshape"]
    copying = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s0"], ["y"]),
        ],
        {"x": [2, 3, 4]},
        {"y": [6, 4]},
        shapes,
    )
    model, report = fuse(copying)
    assert (
        ops(model) == ["Reshape", "Reshape"]
        and "copies a dimension" in reasons(report, "reshape-chain")[0]
    )
