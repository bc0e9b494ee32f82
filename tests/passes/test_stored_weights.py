"""The store-float-weights pass: a float op's weight stored in 8 bits moves each output by at
most half a step per input it sums, onnxruntime folds the expansion at load, and what cannot be
stored safely is declined with the reason."""

from __future__ import annotations

import platform

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph.kernels import optimized_graph
from qgraph.passes import stored_weights
from qgraph.passes.stored_weights import StoredWeightsPass
from qgraph.quant.spec import QuantSpec, quantize_weight
from qgraph.targets import same_arch

RNG = np.random.default_rng(0)
CONV_W = (RNG.standard_normal((16, 8, 3, 3)) * 0.3).astype(np.float32)
GEMM_W = (RNG.standard_normal((10, 64)) * 0.2).astype(np.float32)
MATMUL_W = (RNG.standard_normal((10, 6)) * 0.5).astype(np.float32)
HOST = qgraph.get_target("auto")
FLOAT32_ROUNDING = 1e-5


def network() -> onnx.ModelProto:
    """Conv -> Flatten -> Gemm (transB) -> MatMul, each with a constant weight."""
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "Wm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "network",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [
            numpy_helper.from_array(a, n)
            for n, a in (("Wc", CONV_W), ("Wg", GEMM_W), ("Wm", MATMUL_W))
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def stored(model: onnx.ModelProto, nodes: tuple[str, ...]):
    """The model with ``nodes``' weights stored, and the pass's report."""
    ir_model = ir.from_proto(model)
    result = StoredWeightsPass(nodes, HOST)(ir_model)
    return ir_model, result.details


def outputs(model: onnx.ModelProto | ir.Model, feeds: dict) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return qgraph.verify.run(qgraph.verify.session(ir.from_proto(proto)), feeds)


def single(op: str, weight: np.ndarray, shape: list[int], **attributes) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "W"], ["y"], name="op", **attributes)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def half_step_bound(op: str, weight: np.ndarray, x: np.ndarray, **attributes) -> np.ndarray:
    """``(s_c / 2) sum_k |x_k|`` for every output: the same op run on ``|x|`` with every
    weight of channel ``c`` set to ``s_c / 2``."""
    axis = 0 if op == "Conv" or attributes.get("transB") else 1
    others = tuple(d for d in range(weight.ndim) if d != axis)
    scale = np.abs(weight).max(axis=others, keepdims=True) / 127
    half_steps = np.broadcast_to(scale / 2, weight.shape).astype(np.float32)
    return outputs(single(op, half_steps, list(x.shape), **attributes), {"x": np.abs(x)})["y"]


@pytest.mark.parametrize(
    ("op", "weight", "shape", "attributes"),
    [
        ("Conv", CONV_W, [3, 8, 5, 5], {"pads": [1, 1, 1, 1]}),
        ("Gemm", GEMM_W, [4, 64], {"transB": 1}),
        ("MatMul", MATMUL_W, [4, 10], {}),
    ],
)
def test_each_output_moves_by_at_most_half_a_step_per_input(op, weight, shape, attributes):
    model = single(op, weight, shape, **attributes)
    x = RNG.standard_normal(shape).astype(np.float32)
    expected = outputs(model, {"x": x})["y"]
    rewritten, report = stored(model, ("op",))
    actual = outputs(rewritten, {"x": x})["y"]
    bound = half_step_bound(op, weight, x, **attributes)
    error = np.abs(actual - expected)
    assert report.stored == ("op",)
    assert np.all(error <= bound * (1 + FLOAT32_ROUNDING) + FLOAT32_ROUNDING)
    assert error.max() > 0.01 * bound.max()  # the weights did move: the check can fail


def test_the_outputs_are_those_of_the_weights_rounded_per_output_channel():
    x = RNG.standard_normal((3, 8, 2, 2)).astype(np.float32)
    rewritten, _ = stored(network(), ("conv", "gemm", "matmul"))
    rounded = network()
    for initializer, axis in zip(rounded.graph.initializer, (0, 0, 1), strict=True):
        weight = numpy_helper.to_array(initializer)
        spec = QuantSpec(ir.DataType.INT8, symmetric=True, axis=axis)
        q = quantize_weight(weight, spec)
        shape = [1] * weight.ndim
        shape[axis] = -1
        dequantized = (q.values.astype(np.float32) * q.scale.reshape(shape)).astype(np.float32)
        initializer.CopyFrom(numpy_helper.from_array(dequantized, initializer.name))
    np.testing.assert_allclose(
        outputs(rewritten, {"x": x})["y"], outputs(rounded, {"x": x})["y"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(not same_arch(HOST.arch, platform.machine()), reason="not this host's CPU")
def test_onnxruntime_folds_the_expansion_at_load_and_the_file_shrinks(tmp_path):
    rewritten, report = stored(network(), ("conv", "gemm", "matmul"))
    assert report.checked and not report.declined
    ops = [node.op_type for node in optimized_graph(rewritten).node]
    assert "Cast" not in ops and "Mul" not in ops
    qgraph.verify.session(rewritten)  # loads
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(network(), before)
    proto = ir.to_proto(rewritten)
    used = {name for node in proto.graph.node for name in node.input}
    kept = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save(proto, after)
    assert after.stat().st_size < 0.5 * before.stat().st_size  # names and graph: the rest
    assert report.stored_bytes < 0.3 * report.float_bytes


def test_a_weight_another_float_op_reads_is_declined():
    model = network()
    model.graph.node.append(helper.make_node("MatMul", ["g", "Wm"], ["y2"], name="twin"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [3, 6]))
    rewritten, report = stored(model, ("matmul", "absent"))
    assert report.stored == ()
    assert report.declined == {
        "matmul": "'twin' reads the same weight in float",
        "absent": "not in the graph",
    }
    assert "Cast" not in [node.op_type for node in rewritten.graph]


def test_a_weight_read_by_two_named_ops_is_stored_once():
    model = network()
    model.graph.node.append(helper.make_node("MatMul", ["g", "Wm"], ["y2"], name="twin"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [3, 6]))
    rewritten, report = stored(model, ("matmul", "twin"))
    assert report.stored == ("matmul", "twin")
    assert [node.op_type for node in rewritten.graph].count("Cast") == 1


def test_a_computed_weight_is_declined():
    model = network()
    model.graph.node[-1].input[1] = "x_weight"
    model.graph.input.append(helper.make_tensor_value_info("x_weight", TensorProto.FLOAT, [10, 6]))
    _, report = stored(model, ("matmul",))
    assert report.declined == {"matmul": "its weight is not a float32 constant"}


def test_a_name_the_model_already_has_is_not_reused():
    model = network()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "Wm_stored"))
    rewritten, report = stored(model, ("matmul",))
    assert report.stored == ("matmul",)
    assert "Wm_stored_2" in rewritten.graph.initializers
    assert rewritten.graph.initializers["Wm_stored"].const_value.numpy().tolist() == [0.0]


def test_a_weight_a_caller_may_feed_is_declined():
    model = network()
    model.graph.input.append(helper.make_tensor_value_info("Wm", TensorProto.FLOAT, [10, 6]))
    _, report = stored(model, ("matmul",))
    assert report.declined == {"matmul": "its weight is also a graph input or output"}


def test_an_expansion_the_runtime_keeps_gets_its_float_weight_back(monkeypatch):
    """Where onnxruntime's graph still casts the 8-bit weight, the op would expand it on every
    run: the float weight comes back, exactly."""
    real = stored_weights.optimized_graph

    def unfolded(model):
        graph = real(model)
        graph.node.append(helper.make_node("Cast", ["Wm_stored"], ["kept"], to=1))
        return graph

    monkeypatch.setattr(stored_weights, "optimized_graph", unfolded)
    x = RNG.standard_normal((3, 8, 2, 2)).astype(np.float32)
    rewritten, report = stored(network(), ("gemm", "matmul"))
    if not report.checked:
        pytest.skip("onnxruntime cannot be asked for this target here")
    assert report.stored == ("gemm",)
    assert report.declined == {"matmul": "onnxruntime would expand its 8-bit weight on every run"}
    matmul = next(node for node in rewritten.graph if node.name == "matmul")
    assert matmul.inputs[1].name == "Wm"
    only_gemm, _ = stored(network(), ("gemm",))
    np.testing.assert_array_equal(
        outputs(rewritten, {"x": x})["y"], outputs(only_gemm, {"x": x})["y"]
    )


TABLE = (RNG.standard_normal((20, 6)) * 0.4).astype(np.float32)


def tied(gather_axis: int = 0) -> onnx.ModelProto:
    """h = Gather(E, ids) + x; logits = h E^T: an output projection tied to the embedding."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"], name="embedding", axis=gather_axis),
        helper.make_node("Add", ["e", "x"], ["h"], name="add"),
        helper.make_node("Transpose", ["E"], ["Et"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"], name="projection"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [4]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 20])],
        [numpy_helper.from_array(TABLE, "E")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_projection_tied_to_an_embedding_stores_the_table_per_row_for_both():
    feeds = {
        "ids": np.array([0, 3, 19, 7], np.int64),
        "x": RNG.standard_normal((4, 6)).astype(np.float32),
    }
    rewritten, report = stored(tied(), ("projection",))
    assert report.stored == ("projection",) and report.tables == ("embedding",)
    assert [node.op_type for node in rewritten.graph].count("Cast") == 1
    rounded = tied()
    q = quantize_weight(TABLE, QuantSpec(ir.DataType.INT8, symmetric=True, axis=0))
    dequantized = (q.values.astype(np.float32) * q.scale.reshape(-1, 1)).astype(np.float32)
    rounded.graph.initializer[0].CopyFrom(numpy_helper.from_array(dequantized, "E"))
    np.testing.assert_allclose(
        outputs(rewritten, feeds)["logits"], outputs(rounded, feeds)["logits"], rtol=1e-6
    )
    assert not np.allclose(
        outputs(rewritten, feeds)["logits"], outputs(tied(), feeds)["logits"], rtol=1e-6
    )
    if report.checked:
        ops = [node.op_type for node in optimized_graph(rewritten).node]
        assert "Cast" not in ops and "Transpose" not in ops


def test_a_table_gathered_along_another_axis_keeps_the_weight_float():
    _, report = stored(tied(gather_axis=1), ("projection",))
    assert report.declined == {"projection": "'embedding' reads the same weight in float"}
