"""Activations after weighted ops are recorded (function unchanged); HardSwish is recognized."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qgraph.passes.fusion.activations import ACTIVATION_KEY

RNG = np.random.default_rng(3)
W = {"W": RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)}


def _conv_then(*nodes, extra=None):
    return [helper.make_node("Conv", ["x", "W"], ["h"]), *nodes], {**W, **(extra or {})}


@pytest.mark.parametrize(
    ("nodes", "extra", "expected"),
    [
        ([helper.make_node("Relu", ["h"], ["y"])], None, "Relu"),
        (
            [helper.make_node("Clip", ["h", "lo", "hi"], ["y"])],
            {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
            "Clip",
        ),
        ([helper.make_node("LeakyRelu", ["h"], ["y"], alpha=0.1)], None, "LeakyRelu"),
        ([helper.make_node("HardSigmoid", ["h"], ["y"])], None, "HardSigmoid"),
        (
            [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["y"])],
            None,
            "SiLU",
        ),
    ],
)
def test_activation_is_recorded_on_the_weighted_op(make_model, fuse, nodes, extra, expected):
    graph_nodes, weights = _conv_then(*nodes, extra=extra)
    model, report = fuse(make_model(graph_nodes, {"x": [1, 4, 3, 3]}, {"y": [1, 4, 3, 3]}, weights))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.metadata_props[ACTIVATION_KEY] == expected
    assert report.activations == {expected: 1}


def test_shared_output_and_dynamic_clip_are_near_misses(make_model, fuse, reasons):
    nodes, weights = _conv_then(
        helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Add", ["r", "h"], ["y"])
    )
    model, report = fuse(make_model(nodes, {"x": [1, 4, 3, 3]}, {"y": [1, 4, 3, 3]}, weights))
    assert ACTIVATION_KEY not in next(n for n in model.graph if n.op_type == "Conv").metadata_props
    assert reasons(report, "activation") == ["Relu is not the only reader of 'h'"]
    nodes, weights = _conv_then(helper.make_node("Clip", ["h", "lo"], ["y"]))
    proto = make_model(nodes, {"x": [1, 4, 3, 3], "lo": []}, {"y": [1, 4, 3, 3]}, weights)
    feeds = {
        "x": RNG.standard_normal((1, 4, 3, 3), dtype=np.float32),
        "lo": np.array(0.1, np.float32),
    }
    _, report = fuse(proto, feeds=feeds)
    assert reasons(report, "activation") == ["Clip bounds are not constants"]


def test_hard_swish_is_recognized_then_recorded(make_model, fuse, ops):
    nodes, weights = _conv_then(
        helper.make_node("HardSigmoid", ["h"], ["g"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["g", "h"], ["y"]),
    )
    model, report = fuse(make_model(nodes, {"x": [1, 4, 3, 3]}, {"y": [1, 4, 3, 3]}, weights))
    assert ops(model) == ["Conv", "HardSwish"] and report.activations == {"HardSwish": 1}


def test_recording_twice_changes_nothing(make_model, fuse):
    import qgraph
    from qgraph.passes.fusion import FusionPass

    nodes, weights = _conv_then(helper.make_node("Relu", ["h"], ["y"]))
    model, _ = fuse(make_model(nodes, {"x": [1, 4, 3, 3]}, {"y": [1, 4, 3, 3]}, weights))
    assert not FusionPass(qgraph.get_target("x86-avx2"))(model).modified
