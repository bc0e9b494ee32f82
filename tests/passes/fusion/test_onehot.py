"""One-hot products as row lookups: exact, out-of-range ids included."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify

RNG = np.random.default_rng(3)
K, N = 6, 5


def one_hot_model(
    ids_type: int = TensorProto.INT64,
    classes: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    ids_shape: tuple[int, ...] = (2, 4, 1),
    weight_is_input: bool = False,
):
    """``MatMul(Cast(Equal(ids, classes)), W)``, the way jax2tf writes an embedding."""
    classes = np.arange(K).reshape(1, 1, K) if classes is None else classes
    weight = RNG.normal(size=(K, N)).astype(np.float32) if weight is None else weight
    nodes = [
        helper.make_node("Equal", ["ids", "classes"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hot_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["hot_f", "W"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("ids", ids_type, list(ids_shape))]
    initializers = [numpy_helper.from_array(classes.astype(_numpy(ids_type)), "classes")]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [K, N]))
    else:
        initializers.append(numpy_helper.from_array(weight, "W"))
    graph = helper.make_graph(
        nodes,
        "one_hot",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*ids_shape[:-1], N])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _numpy(onnx_type: int) -> type:
    return helper.tensor_dtype_to_np_dtype(onnx_type)


@pytest.mark.parametrize("ids_type", [TensorProto.INT64, TensorProto.INT32])
def test_one_hot_product_becomes_an_exact_lookup_with_zero_rows_out_of_range(fuse, ops, ids_type):
    proto = one_hot_model(ids_type)
    ids = np.array([0, K - 1, 2, -1, K, K + 7, -K, 3]).reshape(2, 4, 1).astype(_numpy(ids_type))
    model, report = fuse(proto, feeds={"ids": ids})
    assert report.applied["one-hot-to-gather"] == 1
    assert "MatMul" not in ops(model) and "Gather" in ops(model)
    expected = verify.run(proto.SerializeToString(), {"ids": ids})["y"]
    actual = verify.run(model, {"ids": ids})["y"]
    np.testing.assert_array_equal(actual, expected)  # 1 * w and 0 * w: no rounding at all
    assert not actual[0, 3].any() and not actual[1, 0].any(), "-1 and K select no row"


def test_it_compiles_to_a_float_lookup_that_quantization_leaves_alone():
    proto = one_hot_model()
    calibration = [{"ids": RNG.integers(0, K, (2, 4, 1))} for _ in range(2)]
    options = qgraph.CompileOptions(quantization=qgraph.quant_options(calib=calibration))
    model = qgraph.compile_model(proto, "x86-avx2", options=options).model
    assert {n.op_type for n in model.graph} >= {"Gather"}
    assert not any("Quantize" in n.op_type for n in model.graph)


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (one_hot_model(weight_is_input=True), "not a constant float matrix"),
        (one_hot_model(ids_shape=(2, 4, K)), "do not end in a 1"),
        (one_hot_model(ids_type=TensorProto.INT16), "Gather takes int32 or int64"),
        (
            one_hot_model(weight=np.full((K, N), np.inf, np.float32)),
            "not finite, so 0 * w is not 0",
        ),
    ],
    ids=["computed-weight", "ids-not-ending-in-1", "int16-ids", "infinite-weight"],
)
def test_near_misses_say_why(fuse, ops, reasons, proto, reason):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    feeds = {
        "ids": RNG.integers(0, K, shape).astype(
            _numpy(proto.graph.input[0].type.tensor_type.elem_type)
        )
    }
    if len(proto.graph.input) > 1:
        feeds["W"] = RNG.normal(size=(K, N)).astype(np.float32)
    model, report = fuse(proto, feeds=feeds)
    assert "MatMul" in ops(model)
    assert any(reason in r for r in reasons(report, "one-hot-to-gather"))


@pytest.mark.parametrize(
    "classes",
    [np.arange(1, K + 1).reshape(1, 1, K), RNG.permutation(K).reshape(1, 1, K)],
    ids=["not-0-to-K-1", "shuffled"],
)
def test_other_comparisons_are_no_candidates(fuse, ops, reasons, classes):
    model, report = fuse(
        one_hot_model(classes=classes), feeds={"ids": np.zeros((2, 4, 1), np.int64)}
    )
    assert "MatMul" in ops(model) and reasons(report, "one-hot-to-gather") == []
