"""qgraph.passes.qdq.calibrate: one run over the data gives each annotated activation its
scale and zero point, or the reason its readers stay in float."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.annotate import (
    AnnotatePass,
    KeepFloat,
    NodeAnnotation,
    take_annotation,
)
from qgraph.passes.qdq.calibrate import ActivationQuantization, Calibrator
from qgraph.recipe import quant_options
from qgraph.targets import get_target

TARGET = get_target("x86-vnni")


def _two_matmuls() -> ir.Model:
    """``x -> MatMul(W) -> y`` and ``Log(x) -> MatMul(W) -> z`` (Log of x < 0 is NaN)."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
            helper.make_node("Log", ["x"], ["logx"], name="log"),
            helper.make_node("MatMul", ["logx", "W"], ["z"], name="mm_log"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4]),
        ],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def test_each_activation_gets_a_range_or_a_reason_and_batches_are_counted():
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    options = quant_options(calib=data, budget="none")
    model = _two_matmuls()
    AnnotatePass(TARGET, options)(model)
    annotated = {n: a for n in model.graph if (a := take_annotation(n, NodeAnnotation))}
    seen = []
    calibration = Calibrator(TARGET, options, lambda done, total: seen.append(done)).run(
        model, annotated, {}
    )
    assert isinstance(calibration.ranges["x"], ActivationQuantization)
    assert calibration.ranges["logx"] == KeepFloat("the range of 'logx' is not finite")
    assert seen[-1] == 3 and calibration.grams == {}
