"""A residual Add and the RMSNorm after it become one SkipSimplifiedLayerNormalization; a
residual Add before a LayerNorm becomes a Sum, which onnxruntime does not fuse into its slower
SkipLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qgraph import verify
from qgraph.kernels import optimized_graph
from qgraph.passes.fusion.residual import AVOIDED_FUSION, RULE_NAME, UNFUSED_RULE

D = 16
RNG = np.random.default_rng(4)


def _pre_norm_block(a_shape=("batch", 3, D), b_shape=("batch", 3, D)):
    """s = a + b; y = RMSNorm(s) (decomposed, as exporters write it); z = s + y."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Pow", ["s", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["s", "rms"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
        helper.make_node("Add", ["s", "y"], ["z"]),
    ]
    constants = {
        "two": np.array(2.0, np.float32),
        "axes": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "gamma": RNG.uniform(0.5, 1.5, D).astype(np.float32),
    }
    return nodes, {"a": list(a_shape), "b": list(b_shape)}, {"z": ["batch", 3, D]}, constants


def _feeds(batch: int = 2, b_rows: int = 3) -> dict[str, np.ndarray]:
    return {
        "a": RNG.standard_normal((batch, 3, D)).astype(np.float32),
        "b": RNG.standard_normal((batch, b_rows, D)).astype(np.float32),
    }


def test_residual_add_and_rms_norm_become_one_op(make_model, runtime_fuse, ops):
    nodes, inputs, outputs, constants = _pre_norm_block()
    proto = make_model(nodes, inputs, outputs, constants, opset=18)
    model, report = runtime_fuse(proto, feeds=_feeds())
    assert report.applied[RULE_NAME] == 1
    assert ops(model) == ["com.microsoft::SkipSimplifiedLayerNormalization", "Add"]
    fused = model.graph.node(0)
    assert model.graph.node(1).inputs[0] is fused.outputs[3], "the sum is read from the op"


def test_a_broadcasting_add_stays(make_model, runtime_fuse, ops, reasons):
    nodes, inputs, outputs, constants = _pre_norm_block(b_shape=("batch", 1, D))
    proto = make_model(nodes, inputs, outputs, constants, opset=18)
    model, report = runtime_fuse(proto, feeds=_feeds(b_rows=1))
    assert "com.microsoft::SkipSimplifiedLayerNormalization" not in ops(model)
    assert "SimplifiedLayerNormalization" in ops(model)
    assert "not of one known shape" in reasons(report, RULE_NAME)[0]


def test_no_fusion_where_the_runtime_has_no_contrib_ops(make_model, runtime_fuse, ops):
    nodes, inputs, outputs, constants = _pre_norm_block()
    proto = make_model(nodes, inputs, outputs, constants, opset=23)
    model, report = runtime_fuse(proto, target="tensorrt", feeds=_feeds())
    assert RULE_NAME not in report.applied
    assert "com.microsoft::SkipSimplifiedLayerNormalization" not in ops(model)


def _post_norm_block(extra_reader: bool = False):
    """s = a + b; y = LayerNorm(s) (a BERT block's residual); with ``extra_reader``, s is also
    an output, which keeps onnxruntime from fusing the Add."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], epsilon=1e-12),
    ]
    constants = {
        "gamma": RNG.uniform(0.5, 1.5, D).astype(np.float32),
        "beta": RNG.standard_normal(D).astype(np.float32),
    }
    outputs = {"y": [2, 3, D], **({"s": [2, 3, D]} if extra_reader else {})}
    return nodes, {"a": [2, 3, D], "b": [2, 3, D]}, outputs, constants


def _runtime_ops(model) -> set[str]:
    return {node.op_type for node in optimized_graph(model).node}


def test_residual_add_before_a_layer_norm_becomes_a_sum_the_runtime_leaves_alone(
    make_model, runtime_fuse, ops
):
    nodes, inputs, outputs, constants = _post_norm_block()
    proto = make_model(nodes, inputs, outputs, constants, opset=18)
    assert AVOIDED_FUSION in {n.op_type for n in optimized_graph(proto.SerializeToString()).node}
    model, report = runtime_fuse(proto, feeds=_feeds())
    assert report.applied[UNFUSED_RULE] == 1
    assert ops(model) == ["Sum", "LayerNormalization"]
    assert AVOIDED_FUSION not in _runtime_ops(model)
    feeds = _feeds()
    fused_by_runtime = verify.run(proto.SerializeToString(), feeds, optimize=True)
    assert not verify.compare(fused_by_runtime, verify.run(model, feeds, optimize=True))


@pytest.mark.parametrize(
    ("extra_reader", "target"), [(True, "x86-avx2"), (False, "tensorrt")], ids=["read-on", "trt"]
)
def test_the_add_stays_where_the_runtime_would_not_fuse_it(
    make_model, runtime_fuse, ops, extra_reader, target
):
    nodes, inputs, outputs, constants = _post_norm_block(extra_reader)
    proto = make_model(nodes, inputs, outputs, constants, opset=18)
    model, report = runtime_fuse(proto, target=target, feeds=_feeds())
    assert not report.applied.get(UNFUSED_RULE)
    assert ops(model) == ["Add", "LayerNormalization"]
