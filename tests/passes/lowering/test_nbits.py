"""4-bit weight-only MatMuls lowered to MatMulNBits: the packed weights dequantize to exactly
the Q/DQ model's and compute as onnxruntime runs that model (``accuracy_level`` 4, its own
fusion's), so outputs agree with the optimized Q/DQ model's to float32 rounding of the sums
(``FLOAT32_RTOL``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.passes.lowering import LowerPass, compiled_rules
from qgraph.passes.lowering.nbits import _pack_nibbles
from qgraph.passes.rule_table import near_misses
from qgraph.targets import QuantFormat

RNG = np.random.default_rng(0)


def matmul(k: int, n: int) -> ir.Model:
    """x[3, 7, k] -> MatMul(W[k, n]) -> y."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7, n])],
        [numpy_helper.from_array(RNG.standard_normal((k, n)).astype(np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def weight_only(model: ir.Model, dtype: str, block: int) -> ir.Model:
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(mode="weight-only", weight_dtype=dtype, block_size=block),
        format=QuantFormat.QDQ,
    )
    return qgraph.compile_model(model, "x86-avx2", options=options).model


@pytest.mark.parametrize(
    ("dtype", "k", "block"),
    [("int4", 64, 32), ("uint4", 64, 16), ("int4", 40, 16), ("uint4", 100, 32)],
)
def test_four_bit_weights_lower_to_matmul_nbits_and_match(dtype, k, block):
    qdq = weight_only(matmul(k, 24), dtype, block)
    lowered = LowerPass(qgraph.get_target("x86-avx2"))(ir.from_proto(ir.to_proto(qdq))).model
    nodes = [node for node in lowered.graph if node.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and "MatMul" not in {node.op_type for node in lowered.graph}
    attributes = nodes[0].attributes
    assert (attributes["K"].as_int(), attributes["N"].as_int()) == (k, 24)
    assert attributes["block_size"].as_int() == block
    assert (len(nodes[0].inputs) == 4) == (dtype == "uint4"), "zero points only when not 8"
    assert attributes["accuracy_level"].as_int() == 4
    reference = verify.session(qdq, optimize=True)
    candidate = verify.session(lowered, optimize=True)
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((3, 7, k)).astype(np.float32)
        expected = verify.run(reference, {"x": x})
        assert not verify.compare(expected, verify.run(candidate, {"x": x}))


def test_nibbles_pack_low_first():
    assert _pack_nibbles(np.array([[1, 2, 15]])).tolist() == [[0x21, 0x0F]]


def test_a_block_below_sixteen_stays_in_qdq_form_with_the_reason():
    """qgraph's recipes refuse such blocks; a foreign Q/DQ model may carry them."""
    qdq = weight_only(matmul(64, 8), "int4", 16)
    dequantize = next(node for node in qdq.graph if node.op_type == "DequantizeLinear")
    dequantize.attributes["block_size"] = ir.AttrInt64("block_size", 8)
    for operand in dequantize.inputs[1:]:
        halves = np.repeat(operand.const_value.numpy(), 2, axis=0)
        operand.const_value = ir.tensor(halves, dtype=operand.dtype, name=operand.name)
        operand.shape = ir.Shape(halves.shape)
    target = qgraph.get_target("x86-avx2")
    reasons = {miss.reason for miss in near_misses(qdq, compiled_rules(target))}
    assert "block size 8 is not a power of 2 of at least 16" in reasons
    lowered = LowerPass(target)(qdq).model
    assert "MatMulNBits" not in {node.op_type for node in lowered.graph}


def test_weight_only_mode_is_lowered_by_default_on_the_cpu_targets():
    # onnxruntime's own fusion of the Q/DQ form gives int4 an explicit zero point of 8 (a
    # slower kernel); the lowered MatMulNBits has none.
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(mode="weight-only", weight_dtype="int4", block_size=32)
    )
    model = qgraph.compile_model(matmul(64, 24), "x86-avx2", options=options).model
    (node,) = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(node.inputs) == 3, "no zero points"


def layers(width: int = 64) -> ir.Model:
    """x[2, width] -> (MatMul + bias Add + Relu) -> (MatMul + bias Add): a 2-D MLP, whose
    MatMul + Add the x86 targets would otherwise write as Gemm."""
    nodes, inits = [], []
    for i, relu in enumerate((True, False)):
        source = "x" if i == 0 else f"a{i - 1}"
        nodes += [
            helper.make_node("MatMul", [source, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}" if relu else "y"]),
        ]
        if relu:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        inits += [
            numpy_helper.from_array(
                RNG.standard_normal((width, width)).astype(np.float32), f"W{i}"
            ),
            numpy_helper.from_array(RNG.standard_normal(width).astype(np.float32), f"b{i}"),
        ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize(
    ("mode", "dtype", "bias_op"),
    [("weight-only", "int8", "Sum"), ("weight-only", "int4", "Add"), ("dynamic", "int4", "Add")],
)
def test_weight_only_mlp_layers_with_biases_all_run_matmul_nbits(mode, dtype, bias_op):
    """Weight-only mode keeps MatMul + Add (no Gemm, which has no weight-only kernel), and an
    8-bit MatMul's bias Add is a Sum, so that onnxruntime fuses DQ -> MatMul into MatMulNBits
    instead of MatMul + Add + Relu into a float FusedGemm (passes/lowering/nbits.py). Dynamic
    mode's 4-bit MatMuls are MatMulNBits too, which quantizes the activation at run time."""
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(mode=mode, weight_dtype=dtype, block_size=32)
    )
    compiled = qgraph.compile_model(layers(), "x86-vnni", options=options).model
    op_types = [node.op_type for node in compiled.graph]
    assert "Gemm" not in op_types and op_types.count(bias_op) == 2
    kernels = qgraph.kernels.runtime_kernels(compiled)
    assert kernels.complete and kernels.integer == 2, "both layers in MatMulNBits"
    optimized = {node.op_type for node in qgraph.kernels.optimized_graph(compiled).node}
    assert "MatMulNBits" in optimized and not optimized & {"Gemm", "FusedGemm"}
    with_adds = ir.to_proto(compiled)
    for node in with_adds.graph.node:
        node.op_type = "Add" if node.op_type == "Sum" else node.op_type
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    exact = [verify.session(m, optimize=False) for m in (compiled, ir.from_proto(with_adds))]
    got, expected = (verify.run(sess, feeds)["y"] for sess in exact)
    np.testing.assert_array_equal(got, expected)  # Sum(a, b) is Add(a, b), bit for bit
