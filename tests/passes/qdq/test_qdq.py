"""Annotate + insert-qdq: the right specs in the right places, and numbers a fake-quant
reference and the quantization step predict."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.options import CompileOptions
from qgraph.passes.qdq.calibrate import CalibrationMissingError
from qgraph.quant.calibration import TensorStatistics, estimated_sqnr_db
from qgraph.recipe import RecipeError, quant_options

K, N = 16, 8
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, N)).astype(np.float32)
W_T = RNG.standard_normal((K, N)).astype(np.float32)
BIAS = RNG.standard_normal(K).astype(np.float32)
W_R = RNG.standard_normal((K, K)).astype(np.float32)


def mlp(opset: int = 17) -> onnx.ModelProto:
    """x[4,K] -> MatMul(W[K,N]) -> Relu -> Gemm(W_T[K,N], BIAS[K], transB) -> y[4,K];
    x also feeds a ReduceSum."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W_T", "BIAS"], ["y"], name="gemm", transB=1),
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, K]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(W_T, "W_T"),
            numpy_helper.from_array(BIAS, "BIAS"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def batches(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(count)]


def compile_quantized(proto, target="x86-avx2", *, runtime_check=True, **flags) -> ir.Model:
    """``proto`` compiled with ``flags``; without ``runtime_check``, the Q/DQ model as
    insert-qdq wrote it, before groups onnxruntime would run in float go back to float."""
    flags.setdefault("calib", batches())
    flags.setdefault("budget", "none")  # the plan's own tests are in tests/qgraph
    lowering = {"lower-16-bit", "lower", "runtime-check"}
    skipped = frozenset() if runtime_check else frozenset(lowering)
    options = CompileOptions(quantization=quant_options(**flags), skip_passes=skipped)
    return qgraph.compile_model(proto, target, options=options).model


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def dq_node(model: ir.Model, output: str) -> ir.Node:
    return next(
        n for n in model.graph if n.op_type == "DequantizeLinear" and n.outputs[0].name == output
    )


def dequantized_weight(model: ir.Model, name: str) -> np.ndarray:
    """``(q - z) * s`` of weight ``name``, its scale and zero point along its DQ's axis."""
    q = initializer(model, f"{name}_quantized").astype(np.float64)
    scale = initializer(model, f"{name}_scale").astype(np.float64)
    zero_point = initializer(model, f"{name}_zero_point").astype(np.float64)
    axis = dq_node(model, f"{name}_dequantized").attributes["axis"].as_int()
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zero_point.reshape(shape)) * scale.reshape(shape)


def fake_quant(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def test_static_w8a8_matches_a_literal_fake_quant_reference():
    model = compile_quantized(mlp())
    feeds = batches(1, seed=7)[0]
    x = feeds["x"]
    s_x, z_x = initializer(model, "x_scale"), initializer(model, "x_zero_point").astype(np.float64)
    h = fake_quant(x, s_x, z_x, 0, 255) @ dequantized_weight(model, "W")
    r = np.maximum(h, 0)
    s_r, z_r = initializer(model, "r_scale"), initializer(model, "r_zero_point").astype(np.float64)
    s_wt = initializer(model, "W_T_scale")
    wt = dequantized_weight(model, "W_T")
    bias_q = initializer(model, "BIAS_gemm_quantized") * (s_r * s_wt)
    expected = fake_quant(r, s_r, z_r, 0, 255) @ wt.T + bias_q
    actual = verify.run(model, feeds)["y"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_static_error_stays_within_the_quantization_step():
    model = compile_quantized(mlp())
    x = batches(1, seed=7)[0]["x"]
    s_x = float(initializer(model, "x_scale"))
    s_w = initializer(model, "W_scale")
    # |xW - x'W'| <= sum_k |x_k||dW_k| + |W_k||dx_k| + |dx_k||dW_k|; |dx| <= s_x/2, |dW| <= s_w/2
    bound = np.abs(x) @ np.broadcast_to(s_w / 2, W.shape) + s_x / 2 * np.abs(W).sum(0)
    bound += K * s_x / 2 * s_w / 2
    h = matmul_output(model, x)
    assert (np.abs(h - x @ W) <= bound + 1e-6).all()
    assert np.abs(h - x @ W).max() > 0, "the MatMul really is quantized"


def test_specs_follow_the_target():
    model = compile_quantized(mlp())
    w_q = initializer(model, "W_quantized")
    assert w_q.dtype == np.int8 and (initializer(model, "W_zero_point") == 0).all()
    assert np.abs(w_q.astype(np.int64)).max() == 63, "7 bits: int16 pair sums cannot saturate"
    assert dq_node(model, "W_dequantized").attributes["axis"].as_int() == 1  # MatMul [K, N]
    assert dq_node(model, "W_T_dequantized").attributes["axis"].as_int() == 0  # Gemm transB
    assert initializer(model, "W_T_scale").shape == (K,)
    assert initializer(model, "x_zero_point").dtype == np.uint8
    assert initializer(model, "BIAS_gemm_quantized").dtype == np.int32
    vnni = compile_quantized(mlp(), target="x86-vnni")
    assert np.abs(initializer(vnni, "W_quantized")).max() == 127


def test_a_gemm_bias_exported_as_one_row_becomes_int32():
    """``C`` of shape ``[1, N]`` broadcasts like ``[N]``; the quantized bias is that vector."""
    proto = mlp()
    bias = next(i for i in proto.graph.initializer if i.name == "BIAS")
    bias.CopyFrom(numpy_helper.from_array(BIAS.reshape(1, K), "BIAS"))
    model = compile_quantized(proto)
    assert initializer(model, "BIAS_gemm_quantized").shape == (K,)
    reference = compile_quantized(mlp())
    feeds = batches(1, seed=7)[0]
    np.testing.assert_array_equal(verify.run(model, feeds)["y"], verify.run(reference, feeds)["y"])


def test_only_weighted_op_inputs_are_quantized():
    model = compile_quantized(mlp())
    sum_node = next(n for n in model.graph if n.op_type == "ReduceSum")
    assert sum_node.inputs[0].name == "x", "the ReduceSum still reads the float input"
    quantized = sorted(n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear")
    assert quantized == ["r", "x"]


def test_one_pair_per_consumer_where_the_target_wants_it():
    proto = mlp()
    proto.graph.node.append(helper.make_node("MatMul", ["x", "W_T"], ["h2"], name="mm2"))
    proto.graph.output.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, [4, N]))
    shared = compile_quantized(proto)
    x_pairs = [n for n in shared.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"]
    assert len(x_pairs) == 1
    avx2 = qgraph.get_target("x86-avx2")
    per_consumer = dataclasses.replace(
        avx2, activations=dataclasses.replace(avx2.activations, per_consumer=True)
    )
    split = compile_quantized(proto, target=per_consumer)
    x_pairs = [n for n in split.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"]
    assert len(x_pairs) == 2


def test_dynamic_mode_quantizes_activations_at_run_time():
    model = compile_quantized(mlp(), mode="dynamic", calib=None)
    ops = [n.op_type for n in model.graph]
    assert ops.count("DynamicQuantizeLinear") == 2 and "QuantizeLinear" not in ops
    feeds = batches(1, seed=3)[0]
    expected, actual = verify.run(mlp().SerializeToString(), feeds), verify.run(model, feeds)
    assert verify.relative_error(expected["y"], actual["y"]) < 0.05


def test_weight_only_int4_is_per_block_at_opset_21():
    model = compile_quantized(
        mlp(),
        mode="weight-only",
        weight_dtype="int4",
        block_size=16,
        calib=None,
        runtime_check=False,  # onnxruntime fuses no blocked DQ of a transB Gemm's weight
    )
    assert model.opset_imports[""] == 21
    dequantize = dq_node(model, "W_dequantized")
    assert dequantize.attributes["block_size"].as_int() == 16
    assert dequantize.attributes["axis"].as_int() == 0
    assert model.graph.initializers["W_quantized"].const_value.dtype == ir.DataType.INT4
    assert "QuantizeLinear" not in [n.op_type for n in model.graph]
    feeds = batches(1, seed=3)[0]
    s_w = initializer(model, "W_scale")  # [K / 16, N]
    w_dq = initializer(model, "W_quantized").astype(np.float32) * np.repeat(s_w, 16, axis=0)
    h_expected = feeds["x"] @ w_dq
    h = matmul_output(model, feeds["x"])
    np.testing.assert_allclose(h, h_expected, rtol=0, atol=1e-5 * np.abs(h_expected).max())


def test_int16_override_raises_the_opset_and_the_width():
    # as insert-qdq writes it: lowering then turns the Gemm into two 8-bit digit products
    model = compile_quantized(mlp(), tensor={"r": {"dtype": "int16"}}, runtime_check=False)
    assert model.opset_imports[""] == 21
    assert initializer(model, "r_zero_point").dtype == np.int16
    assert initializer(model, "x_zero_point").dtype == np.uint8


def test_exclusions_and_float_reasons_are_reported():
    result = qgraph.compile_model(
        mlp(),
        "x86-avx2",
        options=CompileOptions(quantization=quant_options(calib=batches(), exclude_node=["gemm"])),
    )
    annotate = next(r for r in result.records if r.name == "annotate").details
    assert annotate.float_reasons == {"gemm": ("Gemm", "excluded by the user (pattern 'gemm')")}
    inserted = next(r for r in result.records if r.name == "insert-qdq").details
    assert dict(inserted.quantized) == {"MatMul": 1} and inserted.activation_pairs == 1


def test_an_activation_with_a_non_finite_range_stays_in_float():
    proto = mlp()
    proto.graph.node.extend(
        [
            helper.make_node("Log", ["x"], ["logx"], name="log"),  # log of x < 0 is NaN
            helper.make_node("MatMul", ["logx", "W_T"], ["z"], name="mm_log"),
        ]
    )
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, N]))
    quantization = quant_options(calib=batches(), budget="none")
    result = qgraph.compile_model(
        proto, "x86-avx2", options=CompileOptions(quantization=quantization)
    )
    inserted = next(r for r in result.records if r.name == "insert-qdq").details
    assert inserted.float_reasons == {"mm_log": ("MatMul", "the range of 'logx' is not finite")}
    assert dict(inserted.quantized) == {"MatMul": 1, "Gemm": 1}


def test_static_mode_without_data_says_what_to_pass():
    with pytest.raises(CalibrationMissingError, match="--calib DATA"):
        compile_quantized(mlp(), calib=None)


@pytest.mark.parametrize("target", ["x86-avx2", "tensorrt"])
def test_computed_weights_are_quantized_per_tensor_where_the_target_multiplies_them(target):
    proto = mlp()
    proto.graph.node.insert(0, helper.make_node("Neg", ["W"], ["W_neg"], name="neg"))
    proto.graph.node[1].input[1] = "W_neg"
    options = CompileOptions(
        quantization=quant_options(calib=batches(), budget="none"),
        skip_passes=frozenset({"constant-folding"}),
    )
    result = qgraph.compile_model(proto, target, options=options)
    annotate = next(r for r in result.records if r.name == "annotate").details
    matmul = next(n for n in result.model.graph if n.name == "mm")
    if qgraph.get_target(target).kernels.activation_products:
        assert "mm" not in annotate.float_reasons
        weight_dq = matmul.inputs[1].producer()
        assert weight_dq.op_type == "DequantizeLinear"
        assert weight_dq.inputs[0].producer().op_type == "QuantizeLinear", "calibrated at run"
        assert weight_dq.inputs[1].const_value.numpy().ndim == 0, "one scale: per tensor"
    else:
        assert annotate.float_reasons["mm"][1].startswith("its weight is not a constant")
        assert matmul.inputs[1].producer().op_type == "Neg"


def heavy_tailed_batches() -> list[dict[str, np.ndarray]]:
    data = batches(16)
    data[0]["x"][0, 0] = 500.0  # one outlier in 1024 values: 8 bits give an SQNR near 29 dB
    return data


def test_a_heavy_tailed_activation_goes_to_16_bits_on_a_target_with_16_bit_kernels():
    avx2 = qgraph.get_target("x86-avx2")
    target = dataclasses.replace(
        avx2, activations=dataclasses.replace(avx2.activations, int16_kernels=True)
    )
    model = compile_quantized(
        mlp(), target, calib=heavy_tailed_batches(), min_sqnr_db=30, runtime_check=False
    )
    quantize = next(
        n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"
    )
    assert quantize.domain == "com.microsoft", "opset 17 has no 16-bit QuantizeLinear"
    assert initializer(model, "x_zero_point").dtype == np.uint16
    assert initializer(model, "r_zero_point").dtype == np.uint8, "the well-behaved one stays"
    eight_bit = compile_quantized(
        mlp(), target, calib=heavy_tailed_batches(), min_sqnr_db=0, runtime_check=False
    )
    assert initializer(eight_bit, "x_zero_point").dtype == np.uint8
    x = batches(1, seed=7)[0]["x"]
    error_16 = verify.relative_error(x @ W, matmul_output(model, x))
    error_8 = verify.relative_error(x @ W, matmul_output(eight_bit, x))
    assert error_16 < error_8 / 10


def test_a_heavy_tailed_activation_leaves_its_reader_in_float_without_16_bit_kernels():
    quantization = quant_options(calib=heavy_tailed_batches(), min_sqnr_db=30, budget="none")
    options = CompileOptions(quantization=quantization)
    result = qgraph.compile_model(mlp(), "x86-avx2", options=options)
    inserted = next(r for r in result.records if r.name == "insert-qdq").details
    assert set(inserted.kept_float) == {"x"} and 25 < inserted.kept_float["x"] < 30
    op, reason = inserted.float_reasons["mm"]
    assert op == "MatMul" and "SQNR of" in reason and "no 16-bit kernels" in reason
    assert "x_zero_point" not in result.model.graph.initializers
    assert "W_quantized" not in result.model.graph.initializers, "its weight stays float too"
    assert initializer(result.model, "r_zero_point").dtype == np.uint8, "the gemm is quantized"
    x = batches(1, seed=7)[0]["x"]
    # two float32 sums of K products, each within K * eps / 2 of the exact one
    float_rounding = K * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(W))
    assert np.all(np.abs(matmul_output(result.model, x) - x @ W) <= float_rounding)


def matmul_output(model: ir.Model, x: np.ndarray) -> np.ndarray:
    probe = ir.serde.serialize_model(model)
    probe.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    return verify.run(probe.SerializeToString(), {"x": x})["h"]


def test_estimated_sqnr_matches_the_uniform_noise_model():
    stats = TensorStatistics(histogram=True)
    stats.update(np.random.default_rng(0).uniform(-1, 1, 100_000))
    scale = 2 / 255
    # signal E[x^2] = 1/3 for U(-1, 1); noise scale^2 / 12
    expected = 10 * np.log10((1 / 3) / (scale**2 / 12))
    assert abs(estimated_sqnr_db(stats, -1.0, 1.0, scale) - expected) < 0.05


def test_16_bits_on_a_target_without_them_is_refused_by_name():
    with pytest.raises(RecipeError, match="tensor 'r': target tensorrt has no 16-bit"):
        compile_quantized(mlp(), target="tensorrt", tensor={"r": {"dtype": "int16"}})


def residual_block() -> onnx.ModelProto:
    """x[4,K] -> MatMul(W_R[K,K]) -> Add(BIAS) -> Add(x) -> y: a transformer's residual."""
    nodes = [
        helper.make_node("MatMul", ["x", "W_R"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "BIAS"], ["hb"], name="bias"),
        helper.make_node("Add", ["hb", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, K])],
        [numpy_helper.from_array(W_R, "W_R"), numpy_helper.from_array(BIAS, "BIAS")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tensorrt_quantizes_the_skip_input_and_keeps_the_bias_float():
    model = compile_quantized(residual_block(), target="tensorrt")
    assert qgraph.get_target("tensorrt").check(model) == []
    residual = next(n for n in model.graph if n.name == "residual")
    assert [v.producer().op_type for v in residual.inputs] == ["Add", "DequantizeLinear"]
    quantized = [n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"]
    assert quantized == ["x"], "one pair, shared by the MatMul and the residual Add"
    assert initializer(model, "x_zero_point").dtype == np.int8
    assert initializer(model, "x_zero_point") == 0
    np.testing.assert_array_equal(initializer(model, "BIAS"), BIAS)  # float: no int32 DQ
    x = batches(1, seed=7)[0]["x"]
    s_x, s_w = float(initializer(model, "x_scale")), initializer(model, "W_R_scale")
    x_q = fake_quant(x, s_x, 0, -128, 127)
    expected = x_q @ (initializer(model, "W_R_quantized") * s_w) + BIAS + x_q
    actual = verify.run(model, {"x": x})["y"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # each of x's two reads is off by at most s_x / 2, each weight by s_w / 2
    bound = np.abs(x) @ np.broadcast_to(s_w / 2, W_R.shape) + s_x / 2 * np.abs(W_R).sum(0)
    bound += K * s_x / 2 * s_w / 2 + s_x / 2
    assert (np.abs(actual - (x @ W_R + BIAS + x)) <= bound + 1e-5).all()


def test_cpu_targets_leave_residual_inputs_float():
    for target in ("x86-vnni", "x86-avx2", "arm64"):
        model = compile_quantized(residual_block(), target=target)
        residual = next(n for n in model.graph if n.name == "residual")
        assert "x" in [v.name for v in residual.inputs], target


@pytest.mark.parametrize("count", [4, 8 * K])
def test_a_16_bit_gemm_takes_gptq_only_from_enough_calibration_rows(count):
    """Where its activation runs as 16-bit digits, GPTQ rounds the Gemm's weight unless asked
    otherwise, but only from 32 rows per input (4 a batch): fewer fit the calibration set."""
    flags = {"calib": batches(count), "budget": "none", "tensor": {"r": {"dtype": "int16"}}}
    options = CompileOptions(quantization=quant_options(**flags))
    result = qgraph.compile_model(mlp(), "x86-avx2", options=options)
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert inserted.gptq_weights == (1 if 4 * count >= 32 * K else 0)
