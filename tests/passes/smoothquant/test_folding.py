"""SmoothQuant's folding: where ``X / s`` goes for each producer of ``X``, why it cannot go, and
the constants it rewrites."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.smoothquant.folding import (
    Channels,
    Rescale,
    apply,
    fold_plan,
    insert_division,
    replace_constant,
)

RNG = np.random.default_rng(0)
CHANNELS = Channels(count=4, axis=1, rank=2)
"""A [rows, 4] activation's channels."""


def _model(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> ir.Model:
    """``x`` [2, 4] -> ``nodes``, shapes inferred. The graph output ``y`` need not be written:
    a fold stops at graph outputs, so the values under test are not outputs."""
    graph = helper.make_graph(
        nodes,
        "folding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in constants.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(out for node in model.graph for out in node.outputs if out.name == name)


def _weights(count: int = 4) -> np.ndarray:
    return RNG.standard_normal((4, count)).astype(np.float32)


def _folded(plan: list[Rescale]) -> list[tuple[str, int, int, int]]:
    return [(r.node.name, r.index, r.axis, r.power) for r in plan]


def test_a_layer_norm_takes_the_division_into_gamma_and_beta():
    scale = np.ones(4, np.float32)
    model = _model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="norm")],
        {"g": scale, "b": scale},
    )
    plan = fold_plan(_value(model, "h"), CHANNELS)
    assert _folded(plan) == [("norm", 1, 0, -1), ("norm", 2, 0, -1)]


def test_a_matmul_takes_it_into_its_weights_output_channels():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")], {"W": _weights()})
    assert _folded(fold_plan(_value(model, "h"), CHANNELS)) == [("mm", 1, 1, -1)]


def test_it_passes_through_a_relu_to_the_matmul_before_it():
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
        ],
        {"W": _weights()},
    )
    assert _folded(fold_plan(_value(model, "r"), CHANNELS)) == [("mm", 1, 1, -1)]


def test_a_tensor_read_elsewhere_on_the_way_stops_the_fold():
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Add", ["h", "r"], ["y"], name="other_reader"),
        ],
        {"W": _weights()},
    )
    assert fold_plan(_value(model, "r"), CHANNELS) == "'h' on the way has other readers"


@pytest.mark.parametrize(
    ("producer", "reason"),
    [
        ("Sigmoid", "its producer Sigmoid 'p' does not commute with a scale"),
        ("Softmax", "its producer Softmax 'p' does not commute with a scale"),
    ],
)
def test_a_producer_that_does_not_commute_with_a_scale_says_so(producer, reason):
    model = _model([helper.make_node(producer, ["x"], ["h"], name="p")], {})
    assert fold_plan(_value(model, "h"), CHANNELS) == reason


def test_a_constant_broadcast_across_the_channels_cannot_take_a_per_channel_scale():
    model = _model(
        [helper.make_node("Mul", ["x", "c"], ["h"], name="mul")], {"c": np.ones(1, np.float32)}
    )
    reason = fold_plan(_value(model, "h"), CHANNELS)
    assert reason == "constant 'c' of shape [1] broadcasts across the channels"


def test_apply_multiplies_the_constant_by_the_scale_to_its_power_on_its_axis():
    weights = _weights()
    model = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")], {"W": weights})
    (rescale,) = fold_plan(_value(model, "h"), CHANNELS)
    scale = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    apply(rescale, scale)
    np.testing.assert_allclose(
        model.graph.node("mm").inputs[1].const_value.numpy(), weights / scale
    )


def test_replace_constant_leaves_the_old_one_to_its_other_readers():
    weights = _weights()
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="tied"),
        ],
        {"W": weights},
    )
    replace_constant(model.graph.node("mm"), 1, weights * 2)
    assert model.graph.node("mm").inputs[1].name == "W.smoothed"
    np.testing.assert_array_equal(model.graph.node("tied").inputs[1].const_value.numpy(), weights)


def test_insert_division_puts_a_mul_by_one_over_s_before_the_readers():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="reader")], {})
    x = model.graph.inputs[0]
    scale = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    mul = insert_division(x, [model.graph.node("reader")], scale, CHANNELS)
    assert model.graph.node("reader").inputs[0] is mul.outputs[0]
    assert mul.inputs[0] is x
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy(), 1 / scale)
