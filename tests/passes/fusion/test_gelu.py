"""GELU in its erf and tanh forms becomes Gelu (or onnxruntime's contrib op)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper


def _erf_gelu(scale_op: str, half_first: bool, half: float = 0.5):
    root = math.sqrt(2.0) if scale_op == "Div" else 1 / math.sqrt(2.0)
    nodes = [
        helper.make_node(scale_op, ["x", "root"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["p"]),
    ]
    if half_first:
        nodes += [
            helper.make_node("Mul", ["half", "x"], ["hx"]),
            helper.make_node("Mul", ["hx", "p"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["p", "half"], ["hp"]),
            helper.make_node("Mul", ["x", "hp"], ["y"]),
        ]
    constants = {
        "root": np.array(root, np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(half, np.float32),
    }
    return nodes, constants


CUBIC_TERMS = {
    "pow": [
        helper.make_node("Pow", ["x", "three"], ["cube"]),
        helper.make_node("Mul", ["cube", "k"], ["kc"]),
    ],
    "jax2tf": [
        helper.make_node("Mul", ["k", "x"], ["kx"]),
        helper.make_node("Mul", ["x", "kx"], ["kx2"]),
        helper.make_node("Mul", ["x", "kx2"], ["kc"]),
    ],
}
"""``0.044715 x^3`` as most exporters write it, and as jax2tf does (magika's)."""


def _tanh_gelu(cubic_term: str = "pow", one_shape: tuple[int, ...] = ()):
    nodes = [
        *CUBIC_TERMS[cubic_term],
        helper.make_node("Add", ["x", "kc"], ["inner"]),
        helper.make_node("Mul", ["inner", "s"], ["z"]),
        helper.make_node("Tanh", ["z"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["p"]),
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Mul", ["hx", "p"], ["y"]),
    ]
    constants = {
        "three": np.array(3.0, np.float32),
        "k": np.array(0.044715, np.float32),
        "s": np.array(math.sqrt(2 / math.pi), np.float32),
        "one": np.ones(one_shape, np.float32),
        "half": np.array(0.5, np.float32),
    }
    return nodes, constants


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
@pytest.mark.parametrize("half_first", [True, False])
def test_erf_gelu_to_contrib_before_opset_20(make_model, fuse, ops, scale_op, half_first):
    nodes, constants = _erf_gelu(scale_op, half_first)
    model, _report = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants))
    assert ops(model) == ["com.microsoft::Gelu"] and model.opset_imports["com.microsoft"] == 1


def test_gelu_op_from_opset_20(make_model, fuse, ops):
    nodes, constants = _erf_gelu("Div", True)
    model, _ = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants, opset=20))
    assert ops(model) == ["Gelu"]
    nodes, constants = _tanh_gelu()
    model, _ = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants, opset=20))
    assert (
        ops(model) == ["Gelu"]
        and model.graph.node(0).attributes.get_string("approximate") == "tanh"
    )


@pytest.mark.parametrize("cubic_term", sorted(CUBIC_TERMS))
def test_tanh_gelu_to_fast_gelu(make_model, fuse, ops, cubic_term):
    nodes, constants = _tanh_gelu(cubic_term, one_shape=(1, 1))
    model, _ = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants))
    assert ops(model) == ["com.microsoft::FastGelu"]


def test_a_constant_that_broadcasts_x_up_is_no_gelu(make_model, fuse, ops, reasons):
    """``1 + tanh(..)`` with a [1, 1, 1] one makes a [1, 4, 8] output from a [4, 8] x: a Gelu
    of x would lose that dimension."""
    nodes, constants = _tanh_gelu("jax2tf", one_shape=(1, 1, 1))
    model, report = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [1, 4, 8]}, constants))
    assert "Tanh" in ops(model) and reasons(report, "gelu-tanh") == [
        "a constant has more dimensions than x, so the product broadcasts x"
    ]


def test_not_a_gelu(make_model, fuse, ops, reasons):
    nodes, constants = _erf_gelu("Div", True, half=0.6)
    model, report = fuse(make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants))
    assert "Erf" in ops(model) and reasons(report, "gelu-erf") == [
        "the constants are not 0.5 and 1"
    ]
    nodes, constants = _erf_gelu("Div", True)
    model, report = fuse(
        make_model(nodes, {"x": [4, 8]}, {"y": [4, 8]}, constants), target="tensorrt"
    )
    assert "Erf" in ops(model) and "does not run com.microsoft" in reasons(report, "gelu-erf")[0]
