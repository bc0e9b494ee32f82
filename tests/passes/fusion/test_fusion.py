"""The fusion pass as a whole: reference models, idempotence, random chains, the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.options import CompileOptions
from qgraph.passes.fusion import RULES, FusionPass

EXPECTED = {
    "reference-cnn": ({"fold-batchnorm": 6}, {"Relu": 3}, "BatchNormalization"),
    "reference-encoder": ({"layer-norm": 2, "layer-norm-bias": 2, "gelu-erf": 1}, {}, "Erf"),
    "reference-decoder": ({"rms-norm": 2}, {"SiLU": 1}, "Reciprocal"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    return {name: models.fetch(name, cache) for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reference_models_keep_their_function(zoo, name):
    zoo_model = zoo[name]
    result = qgraph.compile_model(zoo_model.model, "x86-avx2")
    report = next(r for r in result.records if r.name == "fusion").details
    applied, activations, gone = EXPECTED[name]
    assert {k: v for k, v in report.applied.items() if v} == applied
    assert report.activations == activations
    assert gone not in result.after.op_histogram
    for feeds in list(read_batches(zoo_model.evaluation))[:3]:
        expected = verify.run(zoo_model.model, feeds)
        assert not verify.compare(expected, verify.run(result.model, feeds))
    again = FusionPass(qgraph.get_target("x86-avx2"))(result.model)
    assert not again.modified, "a second fusion run must change nothing"


def test_explain_reaches_the_compile_records(zoo):
    result = qgraph.compile_model(
        zoo["reference-cnn"].model, "tensorrt", options=CompileOptions(explain=True)
    )
    report = next(r for r in result.records if r.name == "fusion").details
    assert set(report.applied) == {r.name for r in RULES if r.wanted(qgraph.get_target("tensorrt"))}
    assert report.applied["gemm-to-matmul-add"] == 1 and report.near_misses == ()


ACTIVATIONS = ("none", "Relu", "Clip", "LeakyRelu", "SiLU", "HardSwish")


@st.composite
def conv_chains(draw):
    """Conv (random shape, groups, bias) -> BatchNorm -> activation [-> LayerNorm on W]."""
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([1, 3]))
    size = draw(st.integers(kernel, 6))
    weights = {
        "W": draw_array(draw, (cout, cin // groups, kernel, kernel)),
        "gamma": draw_array(draw, (cout,), low=0.2, high=2.0),
        "beta": draw_array(draw, (cout,)),
        "mean": draw_array(draw, (cout,)),
        "var": draw_array(draw, (cout,), low=0.1, high=2.0),
    }
    conv_inputs = ["x", "W"]
    if draw(st.booleans()):
        weights["b"] = draw_array(draw, (cout,))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], group=groups, pads=[kernel // 2] * 4),
        helper.make_node(
            "BatchNormalization",
            ["c", "gamma", "beta", "mean", "var"],
            ["bn"],
            epsilon=draw(st.floats(1e-6, 1e-2)),
        ),
    ]
    nodes += activation_nodes(draw(st.sampled_from(ACTIVATIONS)), "bn", "act", weights)
    if draw(st.booleans()):
        nodes += layer_norm_nodes("act", "y", size, weights, draw)
    else:
        nodes.append(helper.make_node("Identity", ["act"], ["y"]))
    return nodes, weights, (1, cin, size, size), (1, cout, size, size)


def draw_array(draw, shape, low=-1.0, high=1.0) -> np.ndarray:
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def activation_nodes(kind: str, inp: str, out: str, weights) -> list:
    if kind == "none":
        return [helper.make_node("Identity", [inp], [out])]
    if kind == "Clip":
        weights["lo"], weights["hi"] = np.array(0, np.float32), np.array(6, np.float32)
        return [helper.make_node("Clip", [inp, "lo", "hi"], [out])]
    if kind == "SiLU":
        return [
            helper.make_node("Sigmoid", [inp], ["sig"]),
            helper.make_node("Mul", [inp, "sig"], [out]),
        ]
    if kind == "HardSwish":
        return [
            helper.make_node("HardSigmoid", [inp], ["hs"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["hs", inp], [out]),
        ]
    return [helper.make_node(kind, [inp], [out])]


def layer_norm_nodes(inp: str, out: str, size: int, weights, draw) -> list:
    weights["two"], weights["eps"] = np.array(2, np.float32), np.array(1e-5, np.float32)
    weights["ln_gamma"] = draw_array(draw, (size,), low=0.5, high=1.5)
    weights["ln_beta"] = draw_array(draw, (size,))
    return [
        helper.make_node("ReduceMean", [inp], ["m"], axes=[-1]),
        helper.make_node("Sub", [inp, "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "ln_gamma"], ["g"]),
        helper.make_node("Add", ["g", "ln_beta"], [out]),
    ]


def rounding_amplification(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """How many times the chain's output error can exceed ``FLOAT32_RTOL`` with the function
    kept: the rounding of the BatchNorm, folded or not, relative to the output.

    Folded, the Conv computes ``W' x + b'`` with ``W' = W g / s``, ``b' = beta + (b - mean) g
    / s`` and ``s = sqrt(var + eps)``; unfolded, ``(c - mean) g / s + beta``. Either way each
    rounding is relative to the largest term, ``T = max|c| max|g / s| + max|mean g / s| +
    max|beta|``, which can be many times ``max|act|`` where the terms cancel and the activation
    clips what stays (a Relu keeping one value of 0.003 out of terms of 0.3). A LayerNorm at
    the end, ``(act - mean) / std``, then scales that error by ``1 / std`` against an output of
    order one. So the amplification is ``T / max|act|`` without a LayerNorm, ``T / min std``
    with one; at least 1.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in ("c", "act"):
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    values = verify.run(probe.SerializeToString(), feeds)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    epsilon = next(helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon")
    scale = np.abs(weights["gamma"]) / np.sqrt(weights["var"] + epsilon)
    terms = float(
        np.abs(values["c"]).max() * scale.max()
        + np.abs(weights["mean"] * scale).max()
        + np.abs(weights["beta"]).max()
    )
    act = values["act"]
    if any(node.op_type == "ReduceMean" for node in proto.graph.node):
        reference = float(np.sqrt(act.var(axis=-1) + 1e-5).min())
    else:
        reference = float(np.abs(act).max())
    return max(1.0, terms / max(reference, 1e-30))  # |act| <= |bn| <= T: every activation here


def _model(nodes, weights, x_shape, y_shape, extra_inputs=()):
    graph = helper.make_graph(
        nodes,
        "chain",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
            *(
                helper.make_tensor_value_info(n, TensorProto.FLOAT, weights[n].shape)
                for n in extra_inputs
            ),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a, n) for n, a in weights.items() if n not in extra_inputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(chain=conv_chains())
def test_random_chains_fuse_and_keep_their_function(fuse, ops, chain):
    nodes, weights, x_shape, y_shape = chain
    proto = _model(nodes, weights, x_shape, y_shape)
    feeds = {"x": np.random.default_rng(0).standard_normal(x_shape, dtype=np.float32)}
    amplification = rounding_amplification(proto, feeds)
    assume(amplification < 1000)  # a near-constant row or near-total cancellation
    rtol = verify.FLOAT32_RTOL * amplification
    model, report = fuse(proto, feeds=feeds, rtol=rtol)
    assert "BatchNormalization" not in ops(model)
    if y_shape[-1] == 1:
        declined = {m.rule for m in report.near_misses}
        assert "ReduceMean" not in ops(model) or "layer-norm" in declined
    else:
        assert "ReduceMean" not in ops(model), "the LayerNorm (if any) became one op"
    assert not FusionPass(qgraph.get_target("x86-avx2"))(model).modified


@SETTINGS
@given(chain=conv_chains(), shared=st.booleans())
def test_shared_or_dynamic_weights_are_left_alone(fuse, ops, chain, shared):
    nodes, weights, x_shape, y_shape = chain
    conv = nodes[0]
    if shared:
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        twin = helper.make_node("Conv", ["x", "W"], ["twin"], **attributes)
        nodes = [*nodes, twin, helper.make_node("ReduceSum", ["twin"], ["twin_sum"])]
        proto = _model(nodes, weights, x_shape, y_shape)
        proto.graph.output.append(
            helper.make_tensor_value_info("twin_sum", TensorProto.FLOAT, None)
        )
        feeds = {"x": np.random.default_rng(0).standard_normal(x_shape, dtype=np.float32)}
    else:
        proto = _model(nodes, weights, x_shape, y_shape, extra_inputs=("W",))
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal(x_shape, dtype=np.float32), "W": weights["W"]}
    amplification = rounding_amplification(proto, feeds)
    assume(amplification < 1000)  # a near-constant row or near-total cancellation
    model, report = fuse(proto, feeds=feeds, rtol=verify.FLOAT32_RTOL * amplification)
    assert "BatchNormalization" in ops(model)
    assert [m.rule for m in report.near_misses if m.rule == "fold-batchnorm"] == ["fold-batchnorm"]
    if shared:
        kept = model.graph.initializers["W"]
        np.testing.assert_array_equal(kept.const_value.numpy(), weights["W"])
        assert len(kept.uses()) == 2, "both Convs still read the one, untouched weight"
    else:
        assert [v.name for v in model.graph.inputs] == ["x", "W"]
