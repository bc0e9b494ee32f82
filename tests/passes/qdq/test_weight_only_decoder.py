"""Weight-only decoders with a tied embedding: a Gather from a table ``E`` and an output
projection ``MatMul(h, Transpose(E))`` store ``E`` once (8 bits per row, or 4 in blocks with
``embedding_bits=4``), and onnxruntime runs every weighted op as an integer kernel
(``MatMulNBits``, ``GatherBlockQuantized``, and on x86 ``DynamicQuantizeMatMul`` for the
projection of an 8-bit table) without dequantizing any weight on a run.

The bounds are the quantization steps: a weight dequantizes within ``s_w / 2`` of its float value
(``s_w`` = block max ``|w|`` over 7, or row max over the target's 8-bit levels, 63 with 7-bit
weights; a 4-bit table is asymmetric, uint4 over a range holding 0, whose step (max - min) / 15
<= max ``|w|`` / 7.5 the int4 one bounds).
onnxruntime fuses ``DQ -> MatMul`` into ``MatMulNBits(accuracy_level=4)``, which also rounds
its input per block of ``B`` along ``K``, to int8 within ``s_x / 2`` (``s_x`` at most the
block's max ``|x|`` / 127, which bounds its symmetric and asymmetric forms alike). So a
product is within ``sum_k |x_k| s_w / 2 + s_x / 2 (|w_k| + s_w / 2)`` of ``x w`` in float.
The projection of an 8-bit table on x86 (``dynamic_table_projection``) rounds its input per
tensor instead: ``DynamicQuantizeLinear``'s uint8 over the range of ``x`` and 0, so ``s_x`` is
(max(x, 0) - min(x, 0)) / 255, the same bound with that step.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.kernels import optimized_graph, runtime_kernels
from qgraph.targets import QuantFormat

V, H, F, S = 512, 64, 128, 6  # V * H above canonicalize.FOLD_INPUT_LIMIT: Transpose(E) stays
BLOCK = 32
RNG = np.random.default_rng(0)
E = (RNG.standard_normal((V, H)) * 0.5).astype(np.float32)
W_UP = (RNG.standard_normal((H, F)) / np.sqrt(H)).astype(np.float32)
W_DOWN = (RNG.standard_normal((F, H)) / np.sqrt(F)).astype(np.float32)
ROUNDING = 1 + 1e-5
"""float32 rounding of the dequantized values and sums, relative."""
TARGET = qgraph.get_target("x86-avx2")
TABLE_LEVELS = 2 ** (TARGET.weights.bits - 1) - 1
"""An 8-bit table is stored as the target stores weights (x86-avx2: 7 bits, so that its
dynamic u8 x s8 projection cannot saturate), symmetric over this many levels."""


def tied_decoder() -> onnx.ModelProto:
    """ids -> x = Gather(E) -> h = x + SiLU(x W_up) W_down -> logits = h Transpose(E)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "W_up"], ["u"], name="up"),
        helper.make_node("Sigmoid", ["u"], ["g"], name="gate"),
        helper.make_node("Mul", ["u", "g"], ["a"], name="silu"),
        helper.make_node("MatMul", ["a", "W_down"], ["d"], name="down"),
        helper.make_node("Add", ["x", "d"], ["h"], name="residual"),
        helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied_decoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, S, V])],
        [
            numpy_helper.from_array(array, name)
            for name, array in (("E", E), ("W_up", W_UP), ("W_down", W_DOWN))
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, V, (2, S)).astype(np.int64)} for _ in range(count)]


def weight_only(dtype: str, **flags) -> qgraph.CompileResult:
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(
            mode="weight-only", weight_dtype=dtype, block_size=BLOCK, **flags
        ),
        format=QuantFormat.QDQ,
    )
    return qgraph.compile_model(tied_decoder(), TARGET, options=options)


def with_outputs(model: ir.Model, names: tuple[str, ...]) -> ir.Model:
    """A copy of ``model`` with the values ``names`` as graph outputs too."""
    copy = ir.from_proto(ir.to_proto(model))
    verify.expose_values(copy, names)
    return copy


def row_steps(levels: int) -> np.ndarray:
    """Each row of ``E``'s step, symmetric over ``levels``."""
    return np.abs(E).max(axis=1, keepdims=True) / levels


def block_steps(levels: int, table: np.ndarray = E) -> np.ndarray:
    """The step of each element of ``table``, its block of ``BLOCK`` along the row (the last
    one possibly shorter) shared, over ``levels`` (7 for int4)."""
    blocks = [table[:, start : start + BLOCK] for start in range(0, table.shape[1], BLOCK)]
    steps = [np.abs(block).max(axis=1, keepdims=True) / levels for block in blocks]
    return np.concatenate(
        [np.broadcast_to(step, block.shape) for step, block in zip(steps, blocks, strict=True)],
        axis=1,
    )


def dynamic_step(x: np.ndarray) -> float:
    """``DynamicQuantizeLinear``'s step for ``x``: its range with 0, over 255."""
    return float(max(x.max(), 0) - min(x.min(), 0)) / 255


def dynamically_rounded(x: np.ndarray) -> np.ndarray:
    """``x`` through ``DynamicQuantizeLinear`` and back (uint8, rounding half to even)."""
    scale = dynamic_step(x)
    zero_point = np.clip(np.round(-min(x.min(), 0) / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


def product_bound(
    x: np.ndarray, weight: np.ndarray, steps: np.ndarray, per_tensor: bool = False
) -> np.ndarray:
    """The bound of the module docstring on ``x weight`` [.., N], ``steps`` [K, N] the
    weight's, the input rounded per block of ``BLOCK`` along K (or per tensor)."""
    if per_tensor:
        x_steps = np.full_like(x, dynamic_step(x))
    else:
        blocks = np.abs(x).reshape(*x.shape[:-1], -1, BLOCK).max(axis=-1) / 127
        x_steps = np.repeat(blocks, BLOCK, axis=-1)
    return (np.abs(x) @ steps + x_steps @ (np.abs(weight) + steps / 2)) / 2 * ROUNDING + 1e-6


@pytest.fixture(scope="module")
def int4() -> qgraph.CompileResult:
    return weight_only("int4")


@pytest.fixture(scope="module")
def int4_tables() -> qgraph.CompileResult:
    return weight_only("int4", embedding_bits=4)


@pytest.fixture(scope="module")
def int8() -> qgraph.CompileResult:
    return weight_only("int8")


@pytest.fixture(scope="module")
def compiled(request, int4, int4_tables, int8) -> qgraph.CompileResult:
    """The compile a test's ``compiled`` parameter names."""
    return {"int4": int4, "int4_tables": int4_tables, "int8": int8}[request.param]


def dynamic_projection(variant: str) -> bool:
    """Whether ``variant``'s tied projection rounds its input per tensor at run time (an
    8-bit table on x86)."""
    return variant != "int4_tables"


def table_steps(variant: str) -> np.ndarray:
    """The step of each element of ``E`` as ``variant`` stores it."""
    return (
        block_steps(7)
        if variant == "int4_tables"
        else np.broadcast_to(row_steps(TABLE_LEVELS), E.shape)
    )


def runtime_nbits(model: ir.Model) -> dict[int, int]:
    """The ``MatMulNBits`` of the graph onnxruntime runs, counted by bits."""
    found = [node for node in optimized_graph(model).node if node.op_type == "MatMulNBits"]
    return dict(collections.Counter(helper.get_node_attr_value(n, "bits") for n in found))


def test_int4_keeps_the_tied_table_in_eight_bits_and_the_rest_in_four(int4):
    graph = int4.model.graph
    tables = [v for v in graph.initializers.values() if v.const_value.size >= V * H]
    assert [(t.name, t.dtype) for t in tables] == [("E_quantized", TARGET.weights.dtype)]
    assert "GatherBlockQuantized" not in {node.op_type for node in graph}
    kernels = runtime_kernels(int4.model)
    assert kernels.complete and kernels.quantized == 3, kernels.float_ops
    assert runtime_nbits(int4.model) == {4: 2}
    assert kernels.runtime_ops["com.microsoft::DynamicQuantizeMatMul"] == 1, (
        "the projection, dynamic"
    )
    assert "DequantizeLinear" not in kernels.runtime_ops
    assert "MatMul" not in kernels.runtime_ops


def test_int4_tables_store_the_table_once_and_run_nbits_kernels_only(int4_tables):
    graph = int4_tables.model.graph
    tables = [v for v in graph.initializers.values() if v.const_value.size >= V * H]
    assert [(t.name, t.dtype) for t in tables] == [("E_quantized", ir.DataType.UINT4)]
    gather = next(node for node in graph if node.op_type == "GatherBlockQuantized")
    assert gather.inputs[0].name == "E_quantized"
    assert {k: a.as_int() for k, a in gather.attributes.items()} == {
        "gather_axis": 0,
        "quantize_axis": 1,
        "block_size": BLOCK,
        "bits": 4,
    }
    kernels = runtime_kernels(int4_tables.model)
    assert kernels.complete and kernels.quantized == 4, kernels.float_ops
    assert runtime_nbits(int4_tables.model) == {4: 3}
    assert "DequantizeLinear" not in kernels.runtime_ops
    assert "MatMul" not in kernels.runtime_ops


@pytest.mark.parametrize("compiled", ["int4", "int4_tables", "int8"], indirect=True)
def test_embedding_rows_are_within_half_a_step(compiled, request):
    variant = request.node.callspec.params["compiled"]
    probe = with_outputs(compiled.model, ("x",))
    ids = batches(1)[0]["ids"]
    rows = verify.run(probe, {"ids": ids}, optimize=True)["x"]
    error = np.abs(rows - E[ids])
    assert np.all(error <= table_steps(variant)[ids] / 2 * ROUNDING)
    assert np.any(error > 0), "the rows were rounded"


@pytest.mark.parametrize("compiled", ["int4", "int4_tables", "int8"], indirect=True)
def test_the_tied_projection_is_within_the_quantization_bound(compiled, request):
    """The logits against ``h E^T`` in float, ``h`` the compiled model's own."""
    variant = request.node.callspec.params["compiled"]
    steps, per_tensor = table_steps(variant), dynamic_projection(variant)
    probe = with_outputs(compiled.model, ("h",))
    for feeds in batches():
        outputs = verify.run(probe, feeds, optimize=True)
        h, logits = outputs["h"], outputs["logits"]
        expected = h @ E.T
        error = np.abs(logits - expected)
        assert np.all(error <= product_bound(h, E.T, steps.T, per_tensor)), error.max()
        assert np.any(error > 1e-4 * np.abs(expected).max()), "the projection was quantized"


def test_int8_gathers_integer_rows_and_runs_8_bit_nbits_kernels(int8):
    graph = int8.model.graph
    assert graph.initializers["E_quantized"].const_value.dtype == TARGET.weights.dtype
    tables = [v for v in graph.initializers.values() if v.const_value.size >= V * H]
    assert [t.name for t in tables] == ["E_quantized"], "one copy of the table"
    kernels = runtime_kernels(int8.model)
    assert kernels.complete and kernels.quantized == 3, kernels.float_ops
    assert runtime_nbits(int8.model) == {8: 2}
    assert kernels.runtime_ops["com.microsoft::DynamicQuantizeMatMul"] == 1, (
        "the projection, dynamic"
    )
    assert "DequantizeLinear" not in kernels.runtime_ops


@pytest.mark.parametrize("compiled", ["int4", "int4_tables", "int8"], indirect=True)
def test_the_qdq_model_is_the_float_model_on_dequantized_weights(compiled, request):
    """Unoptimized, the compiled model computes the float model on its dequantized weights,
    in float (the dynamic projection on its input through ``DynamicQuantizeLinear``): the same
    to float32 rounding as numpy doing just that."""
    model = compiled.model
    weights = {
        name: verify.run(with_outputs(model, (name,)), {"ids": batches(1)[0]["ids"]})[name]
        for name in ("E_transposed_dequantized", "W_up_dequantized", "W_down_dequantized")
    }
    table = weights["E_transposed_dequantized"].T
    up, down = weights["W_up_dequantized"], weights["W_down_dequantized"]
    variant = request.node.callspec.params["compiled"]
    steps = table_steps(variant)
    assert np.all(np.abs(table - E) <= steps / 2 * ROUNDING)
    for feeds in batches():
        x = table[feeds["ids"]]
        u = x @ up
        h = x + (u / (1 + np.exp(-u))) @ down
        if dynamic_projection(variant):
            h = dynamically_rounded(h)
        logits = verify.run(model, feeds)["logits"]
        assert not verify.compare({"logits": h @ table.T}, {"logits": logits}, rtol=1e-4)


def test_gptq_gives_a_4_bit_tied_projection_its_own_copy_and_keeps_the_table_nearest(
    int4_tables,
):
    """GPTQ rounds ``W_up``, ``W_down`` and the 4-bit tied projection from their inputs'
    ``X^T X``. The projection gets its own copy of ``E^T`` in the weights' int4, since GPTQ
    fits it to the projection's outputs; the Gather keeps the uint4 table rounded to nearest.
    On the calibration inputs, the projection's output error is below round-to-nearest's:
    what GPTQ minimizes."""
    result = weight_only("int4", weight_rounding="gptq", calib=batches(), embedding_bits=4)
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert inserted.gptq_weights == 3
    graph = result.model.graph
    tables = [v for v in graph.initializers.values() if v.const_value.size >= V * H]
    assert sorted((t.name, t.dtype) for t in tables) == [
        ("E_projection_quantized", ir.DataType.INT4),
        ("E_quantized", ir.DataType.UINT4),
    ]
    probe = with_outputs(result.model, ("x",))
    ids = batches(1)[0]["ids"]
    rows = verify.run(probe, {"ids": ids}, optimize=True)["x"]
    assert np.all(np.abs(rows - E[ids]) <= block_steps(7)[ids] / 2 * ROUNDING)
    assert runtime_kernels(result.model).complete
    assert runtime_nbits(result.model) == {4: 3}
    errors = {}
    for name, compiled in (("gptq", result), ("nearest", int4_tables)):
        probe = with_outputs(compiled.model, ("h",))
        outputs = [verify.run(probe, feeds) for feeds in batches()]
        errors[name] = sum(np.sum((o["logits"] - o["h"] @ E.T) ** 2) for o in outputs)
    assert errors["gptq"] < 0.9 * errors["nearest"], errors


@pytest.mark.parametrize("width", [H, H + BLOCK // 2], ids=["whole-blocks", "partial-block"])
def test_a_4_bit_table_read_by_a_gather_alone_runs_gather_block_quantized(width):
    """A table no projection shares is stored in 4-bit blocks by its Gather (it once went to
    the per-row gather, which onnxruntime refuses for uint4), within half a step a row, a row
    that ends in a partial block too (SmolLM2's 576 in blocks of 128)."""
    rng = np.random.default_rng(9)
    table = (rng.standard_normal((V, width)) * 0.5).astype(np.float32)
    up = (rng.standard_normal((width, F)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "W_up"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, F])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(up, "W_up")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(
            mode="weight-only", weight_dtype="int4", block_size=BLOCK, embedding_bits=4
        ),
        format=QuantFormat.QDQ,
    )
    model = qgraph.compile_model(proto, TARGET, options=options).model
    assert "GatherBlockQuantized" in {node.op_type for node in model.graph}
    ids = batches(1)[0]["ids"]
    rows = verify.run(with_outputs(model, ("x",)), {"ids": ids}, optimize=True)["x"]
    assert np.all(np.abs(rows - table[ids]) <= block_steps(7, table)[ids] / 2 * ROUNDING)


def test_gptq_with_8_bit_weights_keeps_one_4_bit_table():
    """Only 4-bit weights give the projection its own copy: with int8 weights the 4-bit table
    is stored once and read by both, as ``embedding_bits=4`` says."""
    result = weight_only("int8", weight_rounding="gptq", calib=batches(), embedding_bits=4)
    tables = [v for v in result.model.graph.initializers.values() if v.const_value.size >= V * H]
    assert [(t.name, t.dtype) for t in tables] == [("E_quantized", ir.DataType.UINT4)]
    assert runtime_kernels(result.model).complete
