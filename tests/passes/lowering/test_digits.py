"""16-bit activations as two 8-bit digits: the rules fire on MatMul, Gemm and Conv, the
lowered model runs only integer products, and it computes what the 16-bit Q/DQ model does.

The bound (``passes/lowering/digits.py``): in range, the digits give each activation element
within one 16-bit step ``s`` of its 16-bit value, so each output moves by at most
``s * sum_k |w_k|`` over the weights it sums (the dequantized 8-bit ones), plus float32
rounding of the two products' sum.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.passes.lowering import DigitLoweringPass
from qgraph.targets import QuantFormat

RNG = np.random.default_rng(0)
FLOAT32_RTOL = 1e-5


def model_of(node: helper.NodeProto, x_shape, weights: dict[str, np.ndarray]) -> ir.Model:
    graph = helper.make_graph(
        [node],
        "one-op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def batches(shape, count=4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal(shape).astype(np.float32) * 3} for _ in range(count)]


def compile_16_bit(model: ir.Model, data, target="x86-avx2", passes=frozenset()) -> ir.Model:
    """``model`` with its input ``x`` in 16 bits, weights in 8, in Q/DQ form."""
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(
            calib=data, budget="none", smoothquant=None, tensor={"x": {"dtype": "uint16"}}
        ),
        format=QuantFormat.QDQ,
        skip_passes=frozenset({"runtime-check"}) | passes,
    )
    return qgraph.compile_model(model, target, options=options).model


CASES = {
    "matmul": (
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        (2, 5, 24),
        {"W": RNG.standard_normal((24, 16)).astype(np.float32)},
    ),
    "gemm-transB-bias": (
        helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1),
        (6, 24),
        {
            "W": RNG.standard_normal((16, 24)).astype(np.float32),
            "b": RNG.standard_normal(16).astype(np.float32),
        },
    ),
    "conv-strided-padded": (
        helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1]),
        (2, 3, 9, 7),
        {
            "W": RNG.standard_normal((8, 3, 3, 2)).astype(np.float32),
            "b": RNG.standard_normal(8).astype(np.float32),
        },
    ),
    "conv-dilated": (
        helper.make_node("Conv", ["x", "W"], ["y"], dilations=[2, 1]),
        (1, 4, 11, 1),
        {"W": RNG.standard_normal((6, 4, 5, 1)).astype(np.float32)},
    ),
}


def step_and_weights(qdq: ir.Model) -> tuple[float, np.ndarray]:
    """The 16-bit step of ``x`` and the dequantized 8-bit weights, as the Q/DQ model holds
    them."""
    dequantizers = [n for n in qdq.graph if n.op_type == "DequantizeLinear"]
    sixteen = next(n for n in dequantizers if n.inputs[0].dtype == ir.DataType.UINT16)
    step = float(sixteen.inputs[1].const_value.numpy())
    weight = next(
        n for n in dequantizers if n.inputs[0].const_value is not None and n is not sixteen
    )
    values = weight.inputs[0].const_value.numpy().astype(np.float64)
    scale = weight.inputs[1].const_value.numpy().astype(np.float64)
    axis = weight.attributes.get_int("axis", 1)
    shape = [1] * values.ndim
    shape[axis] = -1
    return step, values * scale.reshape(shape)


@pytest.mark.parametrize("case", list(CASES))
def test_the_digits_compute_what_the_16_bit_model_does(case):
    node, shape, weights = CASES[case]
    lowered = digits_within_their_bound(node, shape, shape, weights)
    if node.op_type == "Conv":
        ops = collections.Counter(n.op_type for n in lowered.graph)
        assert ops["Gather"] == 2 and not ops["Slice"], "known sizes: one Gather of taps a digit"


def test_a_conv_of_unknown_height_and_width_slices_its_taps():
    node, shape, weights = CASES["conv-strided-padded"]
    lowered = digits_within_their_bound(node, [*shape[:2], "h", "w"], shape, weights)
    ops = collections.Counter(n.op_type for n in lowered.graph)
    assert ops["Slice"] == 2 * 6 and not ops["Gather"], "a Slice per tap (3 x 2) a digit"


def digits_within_their_bound(node, declared_shape, shape, weights) -> ir.Model:
    """The lowered model of ``node``, checked against the 16-bit Q/DQ model within the bound
    of the module docstring."""
    data = batches(shape)
    model = model_of(node, declared_shape, weights)
    qdq = compile_16_bit(model, data, passes=frozenset({"lower-16-bit"}))
    lowered = ir.from_proto(ir.to_proto(qdq))
    result = DigitLoweringPass(qgraph.get_target("x86-avx2"))(lowered)
    assert result.details.applied == {"sixteen-bit-digits": 1}
    ops = collections.Counter(n.op_type for n in lowered.graph)
    assert ops["MatMulIntegerToFloat"] == 2
    assert not ops[node.op_type], f"the float {node.op_type} is gone"
    step, weight = step_and_weights(qdq)
    reach = np.abs(weight).reshape(weight.shape[0], -1).sum(axis=1)  # Conv: per output channel
    if node.op_type != "Conv":
        reach = np.abs(weight).sum(axis=0 if node.op_type == "MatMul" else 1)
    reference, candidate = verify.session(qdq, optimize=False), verify.session(lowered)
    for feeds in data:
        expected = verify.run(reference, feeds)["y"]
        actual = verify.run(candidate, feeds)["y"]
        bound = step * reach + FLOAT32_RTOL * np.abs(expected).max()
        bound = bound.reshape((1, -1, 1, 1) if node.op_type == "Conv" else (1, -1))
        assert np.all(np.abs(actual - expected) <= bound), node.op_type
    return lowered


def test_a_conv_behind_an_nhwc_transpose_reads_the_digits_of_the_tensor_before_it():
    """An exporter's NHWC -> NCHW Transpose in front of the Conv and the im2col's move back to
    channels-last cancel: the digits are taken of the Transpose's input."""
    weights = {"W": RNG.standard_normal((6, 4, 3, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 9, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = batches((2, 9, 1, 4))
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(
            calib=data, budget="none", smoothquant=None, tensor={"x_nchw": {"dtype": "uint16"}}
        )
    )
    result = qgraph.compile_model(ir.from_proto(proto), "x86-avx2", options=options)
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert "1 activations in 16 bits as asked" in inserted.summary()
    compiled = result.model
    transposes = [n for n in compiled.graph if n.op_type == "Transpose"]
    assert len(transposes) == 1 and transposes[0].inputs[0].producer().op_type == "Add"
    expected = verify.run(verify.session(ir.from_proto(proto)), data[0])["y"]
    actual = verify.run(verify.session(compiled), data[0])["y"]
    assert verify.relative_error(expected, actual) < 0.01


def test_a_16_bit_activation_runs_as_integer_products_in_the_compiled_model():
    node, shape, weights = CASES["conv-strided-padded"]
    data = batches(shape)
    compiled = compile_16_bit(model_of(node, shape, weights), data)
    report = qgraph.kernels.runtime_kernels(compiled)
    assert report.integer == report.quantized == 2 and report.complete
    eight_bit_error = verify.relative_error(
        verify.run(verify.session(model_of(node, shape, weights)), data[0])["y"],
        verify.run(verify.session(compiled), data[0])["y"],
    )
    # per-channel weight steps of max |w| / levels leave an rms error of step / sqrt(12), a
    # fraction (0.3-0.6 for these channels) of max |w| / levels relative to the output
    levels = 2 ** (qgraph.get_target("x86-avx2").weights.bits - 1) - 1
    assert eight_bit_error < 1 / levels, "16-bit activations: the weights' error only"


def test_a_grouped_conv_stays_16_bit_q_dq_with_its_reason():
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=2)
    weights = {"W": RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    qdq = compile_16_bit(model_of(node, (1, 4, 6, 6), weights), batches((1, 4, 6, 6)))
    assert not any(n.op_type == "MatMulIntegerToFloat" for n in qdq.graph)
    misses = DigitLoweringPass(qgraph.get_target("x86-avx2"), explain=True)(qdq).details
    assert {m.reason for m in misses.near_misses} == {"it has more than one group"}


def test_tensorrt_does_not_want_digits():
    assert not qgraph.get_target("tensorrt").activations.int16_digits
