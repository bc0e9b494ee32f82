"""Sibling projections: MatMuls reading one activation become one MatMul and a Split, with the
same values, and quantize to the same weights as they would apart."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.kernels import optimized_graph
from qgraph.passes.fusion import FusionReport, PackProjectionsPass
from qgraph.passes.fusion.packing import ATTENTION_RULE, RULE_NAME
from qgraph.recipe import quant_options
from qgraph.targets import QuantFormat

K = 64
WIDTHS = {"q": 64, "k": 32, "v": 32}
RNG = np.random.default_rng(8)
WEIGHTS = {n: (RNG.standard_normal((K, w)) * 0.1).astype(np.float32) for n, w in WIDTHS.items()}
OTHER = (RNG.standard_normal((WIDTHS["v"], K)) * 0.1).astype(np.float32)


def attention_inputs() -> onnx.ModelProto:
    """q, k and v projections of x (q and k a graph output each, v read by a Relu), and a
    fourth MatMul that reads another tensor: three siblings and a stranger."""
    nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [n], name=f"{n}_proj") for n in WIDTHS]
    nodes += [
        helper.make_node("Relu", ["v"], ["v_relu"], name="relu"),
        helper.make_node("MatMul", ["v_relu", "W_other"], ["o"], name="o_proj"),
    ]
    weights = {f"W{n}": w for n, w in WEIGHTS.items()} | {"W_other": OTHER}
    graph = helper.make_graph(
        nodes,
        "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, K])],
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", 3, 64]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", 3, 32]),
            helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 3, K]),
        ],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, 3, K)).astype(np.float32)
    return {"x": x}


def packed(**flags) -> tuple[ir.Model, FusionReport]:
    flags.setdefault("mode", "weight-only")
    result = PackProjectionsPass(quant_options(**flags), explain=True)(
        qgraph.load(attention_inputs())
    )
    return result.model, result.details


def test_siblings_become_one_matmul_and_a_split_with_the_same_values():
    model, report = packed()
    assert report.applied == {RULE_NAME: 1, ATTENTION_RULE: 0}
    ops = collections.Counter(node.op_type for node in model.graph)
    assert (ops["MatMul"], ops["Split"]) == (2, 1), "q, k, v packed; o_proj alone"
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[0].name == "x"]
    assert matmul.inputs[1].const_value.shape == (K, 128)
    assert [o.name for o in model.graph.outputs] == ["q", "k", "o"]
    # Each output column is the same K-term dot product as before; only the kernel's order of
    # summation may differ: |error| <= K eps sum |x_i w_i| <= K eps max|x| sum|w| per column.
    expected = verify.run(attention_inputs().SerializeToString(), feeds())
    actual = verify.run(model, feeds())
    bound = K * np.finfo(np.float32).eps * np.abs(feeds()["x"]).max()
    for name in ("q", "k"):
        assert np.all(np.abs(actual[name] - expected[name]) <= bound * np.abs(WEIGHTS[name]).sum(0))
    np.testing.assert_allclose(actual["o"], expected["o"], rtol=1e-5, atol=1e-5)


def test_a_sibling_kept_in_float_is_left_out_and_named():
    model, report = packed(exclude_node=["k_proj"])
    assert report.applied == {RULE_NAME: 1, ATTENTION_RULE: 0}
    names = {n.name for n in model.graph}
    assert "k_proj" in names and "q_proj" not in names and "v_proj" not in names
    assert any("stays float" in miss.reason for miss in report.near_misses)
    model, report = packed(exclude_node=["k_proj", "v_proj"])
    assert report.applied == {RULE_NAME: 0, ATTENTION_RULE: 0}


@pytest.mark.parametrize("weight_dtype", ["int4", "int8"])
def test_the_packed_weight_quantizes_to_the_separate_weights_side_by_side(weight_dtype):
    flags = {"mode": "weight-only", "weight_dtype": weight_dtype, "block_size": 32}
    unchecked = frozenset({"runtime-check"})
    together, separate = (
        qgraph.compile_model(
            attention_inputs(),
            "x86-avx2",
            options=qgraph.CompileOptions(
                quantization=quant_options(**flags), skip_passes=skip, format=QuantFormat.QDQ
            ),
        ).model
        for skip in (unchecked, unchecked | {"pack-projections"})
    )
    runtime = collections.Counter(n.op_type for n in optimized_graph(together).node)
    assert runtime["MatMulNBits"] == 2, runtime
    packed_weight = _dequantized_weights(together)["q_proj/packed"]
    apart = _dequantized_weights(separate)
    side_by_side = np.concatenate([apart[f"{n}_proj"] for n in WIDTHS], axis=1)
    np.testing.assert_array_equal(packed_weight, side_by_side)


def _dequantized_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """The dequantized weight each quantized MatMul of ``model`` reads, by the MatMul's name
    (the weights become graph outputs: ``model`` is changed)."""
    weights = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].producer() is not None:
            weights[node.name] = node.inputs[1].name
    verify.expose_values(model, weights.values())
    values = verify.run(model, feeds(), optimize=False)
    return {key: values[name] for key, name in weights.items()}
