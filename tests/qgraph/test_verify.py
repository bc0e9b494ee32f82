"""qgraph.verify: the comparison catches what it must and accepts rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.verify import FLOAT32_RTOL, compare, relative_error, tolerance


def test_identical_outputs_have_no_mismatch():
    out = {"y": np.linspace(-1, 1, 10, dtype=np.float32), "i": np.arange(3)}
    assert compare(out, {k: v.copy() for k, v in out.items()}) == []


def test_error_is_relative_to_the_tensor_scale():
    ref = np.array([1000.0, 0.001], np.float32)
    assert relative_error(ref, ref + np.array([0.0, 0.001], np.float32)) == pytest.approx(
        1e-6, rel=1e-3
    )


@pytest.mark.parametrize(("factor", "ok"), [(0.5, True), (2.0, False)])
def test_float32_threshold_is_the_documented_one(factor, ok):
    ref = np.ones(4, np.float32)
    got = ref + np.float32(FLOAT32_RTOL * factor)
    assert (compare({"y": ref}, {"y": got}) == []) is ok


def test_integers_must_match_exactly():
    mismatch = compare({"i": np.array([1, 2, 3])}, {"i": np.array([1, 2, 4])})
    assert [str(m) for m in mismatch] == ["i: 1 of 3 elements differ"]


@pytest.mark.parametrize(
    ("got", "reason"),
    [
        (np.array([np.nan, 1.0], np.float32), "NaN in different places"),
        (np.array([1.0, np.inf], np.float32), "infinities differ"),
        (np.array([1.0, 2.0], np.float64), "dtype float64"),
        (np.array([1.0, 2.0, 3.0], np.float32), "shape (3,)"),
    ],
)
def test_structural_differences_are_named(got, reason):
    mismatch = compare({"y": np.array([1.0, 2.0], np.float32)}, {"y": got})
    assert len(mismatch) == 1 and reason in mismatch[0].reason


def test_matching_nan_and_inf_are_accepted():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare({"y": ref}, {"y": ref.copy()}) == []


def test_sequences_none_and_missing_outputs():
    seq = [np.ones(2, np.float32), np.zeros(2, np.float32)]
    assert compare({"s": seq, "o": None}, {"s": [a.copy() for a in seq], "o": None}) == []
    assert "[1]" in compare({"s": seq}, {"s": [seq[0], seq[0]]})[0].reason
    assert "missing" in compare({"s": seq}, {})[0].reason


def test_sixteen_bit_floats_get_two_ulps():
    assert tolerance(np.dtype(np.float16)) == pytest.approx(2 * 2.0**-10)
    assert tolerance(np.dtype(np.float32)) == FLOAT32_RTOL
    assert tolerance(np.dtype(np.int64)) == 0.0


def _qdq_matmul() -> onnx.ModelProto:
    """y = DQ(Q(x)) @ W, x [2, 3], with the int8 activation step 0.1 and zero point 0."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
        helper.make_node("MatMul", ["x_dq", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_exposed_quantized_activations_are_returned_with_the_outputs():
    model = qgraph.load(_qdq_matmul())
    assert verify.expose_quantized(model) == ["x_q"]
    x = np.array([[0.12, -0.31, 1.0], [0.0, 0.05, -2.0]], np.float32)
    outputs = verify.run(model, {"x": x})
    np.testing.assert_array_equal(outputs["x_q"], [[1, -3, 10], [0, 0, -20]])


def test_a_fed_model_reads_the_given_integers_and_recomputes_its_own():
    model = qgraph.load(_qdq_matmul())
    assert verify.feed_quantized(model) == {"x_q": "x_q.recomputed"}
    x = np.array([[0.12, -0.31, 1.0], [0.0, 0.05, -2.0]], np.float32)
    given = np.array([[2, -3, 10], [0, 0, -20]], np.int8)  # one step off at [0, 0]
    outputs = verify.run(model, {"x": x, "x_q": given})
    np.testing.assert_array_equal(outputs["x_q.recomputed"], [[1, -3, 10], [0, 0, -20]])
    np.testing.assert_allclose(outputs["y"], (given * np.float32(0.1)) @ np.arange(6).reshape(3, 2))
