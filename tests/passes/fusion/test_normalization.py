"""Decomposed LayerNorm and RMSNorm become single ops, only when they really are those ops."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qgraph import verify
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


def _moments_layer_norm() -> list[helper.NodeProto]:
    """flax's LayerNorm as jax2tf writes it: sums without keepdims, ``E[x^2] - E[x]^2`` floored
    at 0, the statistics reshaped and expanded back, ``gamma`` applied to the inverse std."""
    node = helper.make_node
    return [
        node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0),
        node("Mul", ["sum", "inv_count"], ["mean"]),
        node("Mul", ["x", "x"], ["x_sq"]),
        node("ReduceSum", ["x_sq", "axes"], ["sum_sq"], keepdims=0),
        node("Mul", ["sum_sq", "inv_count"], ["mean_sq"]),
        node("Mul", ["mean", "mean"], ["mean_2"]),
        node("Sub", ["mean_sq", "mean_2"], ["raw_var"]),
        node("Max", ["zero", "raw_var"], ["var"]),
        node("Reshape", ["var", "kept"], ["var_r"]),
        node("Expand", ["var_r", "kept"], ["var_b"]),
        node("Add", ["var_b", "eps"], ["var_eps"]),
        node("Sqrt", ["var_eps"], ["std"]),
        node("Reciprocal", ["std"], ["inv_std"]),
        node("Mul", ["inv_std", "gamma"], ["scale"]),
        node("Reshape", ["mean", "kept"], ["mean_r"]),
        node("Expand", ["mean_r", "kept"], ["mean_b"]),
        node("Sub", ["x", "mean_b"], ["centred"]),
        node("Mul", ["centred", "scale"], ["scaled"]),
        node("Add", ["scaled", "beta"], ["y"]),
    ]


MOMENTS_SHAPE = (2, 6, 5, 3)


def _moments_constants(axis: int, gamma_axis: int | None = None) -> dict[str, np.ndarray]:
    along = [1] * len(MOMENTS_SHAPE)
    gamma_axis = axis if gamma_axis is None else gamma_axis
    along[gamma_axis] = MOMENTS_SHAPE[gamma_axis]
    kept = list(MOMENTS_SHAPE)
    kept[axis] = 1
    return {
        "axes": np.array([axis], np.int64),
        "inv_count": np.array(1.0 / MOMENTS_SHAPE[axis], np.float32),
        "zero": np.array(0.0, np.float32),
        "eps": np.array(1e-6, np.float32),
        "kept": np.array(kept, np.int64),
        "gamma": RNG.uniform(0.5, 2.0, along).astype(np.float32),
        "beta": RNG.normal(size=along).astype(np.float32),
    }


@pytest.mark.parametrize("axis", [1, 3])
def test_a_layer_norm_from_moments_over_any_axis(make_model, fuse, ops, axis):
    """Over a middle axis the op reads the axis moved last and moves it back. The inputs sit
    at 3 +- 1, so the moments form cancels digits: the two differ by its rounding,
    ``eps32 E[x^2] / (v + eps)`` relative in the scale (a few such roundings: 8 of them)."""
    proto = make_model(
        _moments_layer_norm(),
        {"x": list(MOMENTS_SHAPE)},
        {"y": list(MOMENTS_SHAPE)},
        _moments_constants(axis),
    )
    x = (RNG.normal(size=MOMENTS_SHAPE) + 3).astype(np.float32)
    moments = x.astype(np.float64)
    cancellation = (moments**2).mean(axis) / (moments.var(axis) + 1e-6)
    model, report = fuse(proto, feeds={"x": x}, rtol=8 * 2.0**-24 * cancellation.max())
    assert report.applied["moments-layer-norm"] == 1
    moved = ["Transpose", "LayerNormalization", "Transpose"]
    assert ops(model) == (["LayerNormalization"] if axis == 3 else moved)


def test_moments_whose_gamma_varies_along_another_axis_stay(make_model, fuse, ops, reasons):
    proto = make_model(
        _moments_layer_norm(),
        {"x": list(MOMENTS_SHAPE)},
        {"y": list(MOMENTS_SHAPE)},
        _moments_constants(1, gamma_axis=2),
    )
    model, report = fuse(proto)
    assert "LayerNormalization" not in ops(model)
    assert reasons(report, "moments-layer-norm") == [
        "'gamma' varies along another axis than the normalized one"
    ]


def test_magikas_layer_norm_over_positions_moves_by_its_own_rounding(magika_values):
    """magika's LayerNorm over its 512 positions (mostly padding: a small variance beside the
    squared mean) becomes LayerNormalization; its output moves by the cancellation bound."""
    original, fused = magika_values(["Reshape:0", "LayerNorm_0/AddV2_1:0"])
    x = original["Reshape:0"].astype(np.float64)
    cancellation = (x**2).mean(axis=1) / (x.var(axis=1) + 1e-6)
    normalized = original["LayerNorm_0/AddV2_1:0"]
    assert not verify.compare(original, fused, rtol=8 * 2.0**-24 * cancellation.max())
    assert np.abs(fused["LayerNorm_0/AddV2_1:0"] - normalized).max() > 0, "a different rounding"


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
