"""Embedding tables in integers: a Gather reads integer rows and scales them, and a tied
output projection ``MatMul(h, Transpose(E))`` reads the same integer table."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.kernels import runtime_kernels
from qgraph.options import CompileOptions
from qgraph.recipe import quant_options

V, H = 1024, 16  # above canonicalize.FOLD_INPUT_LIMIT, so Transpose(E) stays tied
RNG = np.random.default_rng(0)
E = RNG.standard_normal((V, H)).astype(np.float32)
W = (RNG.standard_normal((H, H)) * 0.3).astype(np.float32)


def tied_lm(extra_reader: bool = False) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W) -> Relu -> MatMul(Transpose(E)) -> logits; optionally
    E also feeds a ReduceSum, a float reader that keeps the table float."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "E_t"], ["logits"], name="lm_head"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, V])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["E"], ["total"], name="spy", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        outputs,
        [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, V, (2, 5)).astype(np.int64)} for _ in range(count)]


def compiled(
    proto: onnx.ModelProto, target: str | qgraph.TargetSpec = "x86-vnni"
) -> qgraph.CompileResult:
    options = CompileOptions(quantization=quant_options(calib=batches(), budget="none"))
    return qgraph.compile_model(proto, target, options=options)


def embedded(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    probe = ir.serde.serialize_model(model)
    probe.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    return verify.run(probe.SerializeToString(), {"ids": ids})["x"]


def test_the_table_is_stored_once_in_eight_bits_and_both_readers_use_it():
    result = compiled(tied_lm())
    graph = result.model.graph
    assert "E" not in graph.initializers
    assert graph.initializers["E_quantized"].const_value.dtype == ir.DataType.INT8
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert inserted.embeddings == 1 and inserted.quantized["MatMul"] == 2
    tables = [t for t in graph.initializers.values() if t.const_value.size >= V * H]
    assert [t.name for t in tables] == ["E_quantized"], "one copy of the table, in 8 bits"
    kernels = runtime_kernels(result.model)
    assert kernels.complete and kernels.quantized == 2, kernels.float_ops


def test_gathered_rows_are_within_half_a_step_of_the_float_rows():
    model = compiled(tied_lm()).model
    ids = batches(1)[0]["ids"]
    step = np.abs(E).max(axis=1) / 127  # symmetric int8, one scale per row
    rows = embedded(model, ids)
    error = np.abs(rows - E[ids])
    assert np.all(error <= step[ids][..., None] / 2 * (1 + 1e-6))
    assert np.any(error > 0), "the rows were rounded"


AVX2 = qgraph.get_target("x86-avx2")
U8_WEIGHTS = dataclasses.replace(
    AVX2,
    name="u8-weights",
    weights=dataclasses.replace(AVX2.weights, dtype=ir.DataType.UINT8, bits=8),
)
"""Weights as uint8 around zero point 128, full 8 bits (a target record may ask for them)."""


@pytest.mark.parametrize(
    ("target", "dtype", "levels"),
    [(AVX2, ir.DataType.INT8, 63), (U8_WEIGHTS, ir.DataType.UINT8, 127)],
    ids=["avx2-7-bit", "uint8"],
)
def test_tables_are_stored_as_the_target_stores_weights(target, dtype, levels):
    """x86-avx2's table in 7 bits (its dynamic u8 x s8 projection cannot saturate); a uint8
    one keeps its zero point."""
    model = compiled(tied_lm(), target).model
    assert model.graph.initializers["E_quantized"].const_value.dtype == dtype
    ids = batches(1)[0]["ids"]
    step = np.abs(E).max(axis=1) / levels
    error = np.abs(embedded(model, ids) - E[ids])
    assert np.all(error <= step[ids][..., None] / 2 * (1 + 1e-6))
    assert np.any(error > step[ids][..., None] / 4), "rounded to this many levels, not finer"


def test_a_table_also_read_in_float_keeps_its_gather_float():
    result = compiled(tied_lm(extra_reader=True))
    graph = result.model.graph
    assert "E" in graph.initializers, "the float reader keeps the float table"
    assert next(n for n in graph if n.name == "embed").inputs[0].name == "E"
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    op, reason = inserted.float_reasons["embed"]
    assert op == "Gather" and "also read in float by" in reason and "'spy'" in reason


def test_a_tied_lm_head_conforms_to_tensorrt():
    """TensorRT's tied ``lm_head`` reads ``DQ(Transpose(E_q))``: a weight per output channel
    (TensorRT folds the Transpose into the constant), not a per-channel activation."""
    result = compiled(tied_lm(), "tensorrt")
    assert result.target.check(result.model) == []
    lm_head = next(node for node in result.model.graph if node.name == "lm_head")
    assert lm_head.inputs[1].producer().op_type == "DequantizeLinear"
