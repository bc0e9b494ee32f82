"""``benchmarks/outlier_split.py``'s rewrite against the Q/DQ arithmetic it stands for.

The split Conv computes ``conv(DQ(Q(x)) + (x - clip(x)), DQ(w))``: the first term as an
integer product (exact in int32, then one float32 scaling), the second as a float32 product
over the positions outside the 8-bit range. Against the same sum in float64, each output is
a dot product of ``n = K C`` terms, each at most ``b = max|w| max|x|``, and float32
accumulation is off by at most ``n eps32`` times the sum of their sizes, ``n b``: the
tolerance allows 4 n^2 eps32 b.
Leaving out the rest moves outputs by the outliers (20 here, against a range of 1.5): far
beyond it, so the test fails if the rest is dropped or added at the wrong position.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import outlier_split
import pytest
from onnx import TensorProto, helper, numpy_helper

BATCH, LENGTH, CHANNELS, OUTPUTS, TAPS = 2, 12, 4, 3, 5
LOW, HIGH = -1.5, 1.5


def magika_like(weight: np.ndarray) -> onnx.ModelProto:
    """x [N, L, C] -> Unsqueeze -> Transpose to NCHW -> Conv [K, 1] -> Squeeze -> max, min."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis3"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["nchw"], perm=[0, 2, 1, 3]),
        helper.make_node("Conv", ["nchw", "w"], ["conv"], kernel_shape=[TAPS, 1]),
        helper.make_node("Squeeze", ["conv", "axis3"], ["squeezed"]),
        helper.make_node("ReduceMax", ["squeezed"], ["most"], axes=[2], keepdims=1),
        helper.make_node("ReduceMin", ["squeezed"], ["least"], axes=[2], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "magika_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, LENGTH, CHANNELS])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, OUTPUTS, 1])
            for n in ("most", "least")
        ],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([3]), "axis3")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def expected(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and min over positions of ``conv(DQ(Q(x)) + x - clip(x), w8)``, in float64."""
    weight, weight_scale = outlier_split.int8_weight(model, "w")
    scale = np.float32((HIGH - LOW) / 255)
    zero_point = round(-LOW / scale)
    low, high = scale * (0 - zero_point), scale * (255 - zero_point)
    q = np.clip(np.rint(x / scale) + zero_point, 0, 255)  # float32, as onnxruntime divides
    seen = scale * (q - zero_point) + (x - np.clip(x, low, high))
    w = weight[..., 0].astype(np.float64) * weight_scale[:, None, None]  # [O, C, K]
    out_length = LENGTH - TAPS + 1
    windows = np.stack([seen[:, t : t + out_length] for t in range(TAPS)], axis=2)  # [N, L', K, C]
    out = np.einsum("nptc,oct->nop", windows, w)
    return out.max(axis=2, keepdims=True), out.min(axis=2, keepdims=True)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(["most", "least"], {"x": x})


@pytest.mark.parametrize("outliers", [0, 3])
def test_split_conv_matches_the_quantized_input_with_its_rest_exact(outliers: int) -> None:
    rng = np.random.default_rng(outliers)
    weight = rng.normal(size=(OUTPUTS, CHANNELS, TAPS, 1)).astype(np.float32)
    x = rng.uniform(-1.4, 1.4, size=(BATCH, LENGTH, CHANNELS)).astype(np.float32)
    places = zip(rng.integers(0, BATCH, outliers), rng.integers(0, LENGTH, outliers), strict=True)
    for n, p in places:
        x[n, p, rng.integers(0, CHANNELS)] = rng.choice([-20.0, 20.0])
    model = magika_like(weight)
    split = outlier_split.split_conv(model, LOW, HIGH)
    assert not [node for node in split.graph.node if node.op_type == "Conv"]
    bound = np.abs(weight).max() * np.abs(x).max()
    terms = TAPS * CHANNELS
    tolerance = 4 * terms * np.finfo(np.float32).eps * terms * bound
    for got, want in zip(run(split, x), expected(model, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
