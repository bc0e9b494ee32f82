"""Decomposed LayerNorm and RMSNorm become single ops, only when they really are those ops."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qgraph.targets.runtime import ORT_LIMITS

RNG = np.random.default_rng(2)
D = 16


def _reduce_mean(inp: str, out: str, opset: int, axis: int = -1) -> list[helper.NodeProto]:
    if opset >= 18:
        return [helper.make_node("ReduceMean", [inp, f"{out}_axes"], [out])]
    return [helper.make_node("ReduceMean", [inp], [out], axes=[axis])]


def _layer_norm(opset: int, square: str = "Pow", divide: bool = True, axis: int = -1):
    nodes = _reduce_mean("x", "mean", opset, axis)
    nodes.append(helper.make_node("Sub", ["x", "mean"], ["d"]))
    nodes.append(
        helper.make_node("Pow", ["d", "two"], ["sq"])
        if square == "Pow"
        else helper.make_node("Mul", ["d", "d"], ["sq"])
    )
    nodes += _reduce_mean("sq", "var", opset, axis)
    nodes += [
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
    ]
    if divide:
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [
            helper.make_node("Reciprocal", ["std"], ["inv"]),
            helper.make_node("Mul", ["d", "inv"], ["n"]),
        ]
    nodes += [
        helper.make_node("Mul", ["gamma", "n"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["y"]),
    ]
    return nodes


def _constants(opset: int, gamma_shape=(D,)) -> dict[str, np.ndarray]:
    values = {
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-5, np.float32),
        "gamma": RNG.uniform(0.5, 1.5, gamma_shape).astype(np.float32),
        "beta": RNG.normal(size=D).astype(np.float32),
    }
    if opset >= 18:
        values["mean_axes"] = values["var_axes"] = np.array([-1], np.int64)
    return values


@pytest.mark.parametrize(
    ("opset", "square", "divide"), [(17, "Pow", True), (18, "Mul", False), (21, "Pow", False)]
)
def test_layer_norm(make_model, fuse, ops, opset, square, divide):
    proto = make_model(
        _layer_norm(opset, square, divide),
        {"x": [2, 3, D]},
        {"y": [2, 3, D]},
        _constants(opset),
        opset=opset,
    )
    model, _report = fuse(proto)
    assert ops(model) == ["LayerNormalization"]
    assert len(model.graph.node(0).inputs) == 3, "beta became the op's bias"


def test_layer_norm_with_a_broadcast_gamma(make_model, fuse, ops):
    proto = make_model(
        _layer_norm(17), {"x": [2, 3, D]}, {"y": [2, 3, D]}, _constants(17, gamma_shape=(1, 1, D))
    )
    model, _ = fuse(proto)
    assert ops(model) == ["LayerNormalization"]


def test_not_a_layer_norm(make_model, fuse, ops, reasons):
    other_axis = make_model(
        _layer_norm(17, axis=1), {"x": [2, 3, D]}, {"y": [2, 3, D]}, _constants(17)
    )
    model, report = fuse(other_axis)
    assert "LayerNormalization" not in ops(model)
    assert reasons(report, "layer-norm") == [
        "a ReduceMean does not reduce exactly the last axis with keepdims"
    ]
    per_token = make_model(
        _layer_norm(17), {"x": [2, 3, D]}, {"y": [2, 3, D]}, _constants(17, gamma_shape=(3, D))
    )
    model, report = fuse(per_token)
    assert "LayerNormalization" not in ops(model)
    assert "not one value per channel" in reasons(report, "layer-norm")[0]
    old = make_model(_layer_norm(13), {"x": [2, 3, D]}, {"y": [2, 3, D]}, _constants(13), opset=13)
    model, report = fuse(old, target="tensorrt")
    assert (
        "opset 13 has no LayerNormalization (from 17) and target tensorrt does not add it"
        in reasons(report, "layer-norm")[0]
    )


def test_before_opset_17_a_layer_norm_is_the_runtimes_layer_norm(make_model, fuse, ops):
    """onnxruntime runs LayerNormalization in the default domain at opsets 11-16 too: one op,
    not its centred RMSNorm (ReduceMean, Sub, SimplifiedLayerNormalization, Add)."""
    old = make_model(_layer_norm(13), {"x": [2, 3, D]}, {"y": [2, 3, D]}, _constants(13), opset=13)
    model, report = fuse(old)
    assert ops(model) == ["LayerNormalization"]
    assert report.applied["layer-norm"] == 1 and report.applied["rms-norm"] == 0


def _rms_norm(opset: int):
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), *_reduce_mean("sq", "ms", opset)]
    nodes += [
        helper.make_node("Add", ["ms", "eps"], ["me"]),
        helper.make_node("Sqrt", ["me"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    return nodes


@pytest.mark.parametrize(
    ("opset", "target", "expected"),
    [
        (17, "x86-avx2", ["SimplifiedLayerNormalization"]),
        (23, "x86-avx2", ["RMSNormalization"]),
        (23, "tensorrt", ["RMSNormalization"]),
    ],
)
def test_rms_norm(make_model, fuse, ops, opset, target, expected):
    if ORT_LIMITS.max_opset < opset:
        pytest.skip(f"onnxruntime {ORT_LIMITS.version} runs opsets up to {ORT_LIMITS.max_opset}")
    constants = {
        k: v
        for k, v in _constants(opset).items()
        if k != "beta" and k != "mean_axes" and k != "var_axes"
    }
    if opset >= 18:
        constants["ms_axes"] = np.array([-1], np.int64)
    proto = make_model(
        _rms_norm(opset),
        {"x": [2, 3, D]},
        {"y": [2, 3, D]},
        constants,
        opset=opset,
        ir_version=11 if opset >= 23 else 10,
    )
    model, _ = fuse(proto, target=target)
    assert ops(model) == expected


def test_rms_norm_stays_where_the_target_has_no_op_for_it(make_model, fuse, ops, reasons):
    constants = {
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "gamma": np.ones(D, np.float32),
    }
    proto = make_model(_rms_norm(17), {"x": [2, D]}, {"y": [2, D]}, constants)
    model, report = fuse(proto, target="tensorrt")
    assert "Sqrt" in ops(model)
    assert "adds no SimplifiedLayerNormalization" in reasons(report, "rms-norm")[0]


def test_a_single_value_is_not_normalized_by_an_op(make_model, fuse, ops, reasons):
    constants = _constants(17)
    constants["gamma"], constants["beta"] = np.ones(1, np.float32), np.zeros(1, np.float32)
    proto = make_model(_layer_norm(17), {"x": [2, 3, 1]}, {"y": [2, 3, 1]}, constants)
    model, report = fuse(proto)
    assert "LayerNormalization" not in ops(model)
    assert "single value" in reasons(report, "layer-norm")[0]
