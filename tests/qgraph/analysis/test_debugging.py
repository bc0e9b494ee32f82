"""Accuracy debugging: local and cumulative SQNR per quantized op, against numpy references,
and the exclusion recipe it writes, read back by a recompile."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import qgraph
from qgraph.analysis.debugging import DebugError, debug_accuracy, write_exclusions
from qgraph.options import CompileOptions
from qgraph.quant.calibration import sqnr_db
from qgraph.recipe import load_recipe, quant_options
from qgraph.targets import QuantFormat

K = 16
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((K, K)).astype(np.float32)
W2 = RNG.standard_normal((K, K)).astype(np.float32)


@pytest.fixture
def chain(make_model) -> onnx.ModelProto:
    """x [8, K] -> MatMul "first" (W1) -> Relu -> h -> MatMul "second" (W2) -> y."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["h"], name="relu"),
            helper.make_node("MatMul", ["h", "W2"], ["y"], name="second"),
        ],
        {"x": [8, K]},
        {"y": [8, K]},
        {"W1": W1, "W2": W2},
    )


def data(count: int = 4, outlier: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((8, K)).astype(np.float32)} for _ in range(count)]
    if outlier:  # one huge input channel: x's 8-bit scale is too coarse for the rest
        batches[0]["x"][0, 0] = 500.0
    return batches


def compiled(proto: onnx.ModelProto, calibration, **flags) -> qgraph.ir.Model:
    options = CompileOptions(quantization=quant_options(calib=calibration, budget="none", **flags))
    return qgraph.compile_model(proto, "x86-avx2", options=options).model


def fake_quantized(model, name: str, x: np.ndarray) -> np.ndarray:
    scale = model.graph.initializers[f"{name}_scale"].const_value.numpy().astype(np.float64)
    zero = model.graph.initializers[f"{name}_zero_point"].const_value.numpy().astype(np.float64)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def dequantized_weight(model, name: str) -> np.ndarray:
    """(q - z) * s per output channel (axis 1)."""
    q, scale, zero = (
        model.graph.initializers[f"{name}_{part}"].const_value.numpy().astype(np.float64)
        for part in ("quantized", "scale", "zero_point")
    )
    return (q - zero) * scale


def test_local_and_cumulative_sqnr_match_a_numpy_reference(chain):
    batches = data()
    model = compiled(chain, batches)
    report = debug_accuracy(qgraph.load(chain), model, batches, impact_batches=len(batches))
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    a = x @ W1
    h = np.maximum(a, 0)
    y = h @ W2
    w1, w2 = dequantized_weight(model, "W1"), dequantized_weight(model, "W2")
    local_first = fake_quantized(model, "x", x) @ w1
    local_second = fake_quantized(model, "h", h) @ w2
    cumulative_second = fake_quantized(model, "h", np.maximum(local_first, 0)) @ w2
    alone_first = np.maximum(local_first, 0) @ W2  # a + (local_first - a), then float
    expected = {
        "first": (
            sqnr_db(np.sum(a**2), np.sum((a - local_first) ** 2)),
            sqnr_db(np.sum(a**2), np.sum((a - local_first) ** 2)),
            sqnr_db(np.sum(y**2), np.sum((y - alone_first) ** 2)),
        ),
        "second": (
            sqnr_db(np.sum(y**2), np.sum((y - local_second) ** 2)),
            sqnr_db(np.sum(y**2), np.sum((y - cumulative_second) ** 2)),
            sqnr_db(np.sum(y**2), np.sum((y - local_second) ** 2)),
        ),
    }
    found = {
        op.node: (op.local_sqnr_db, op.cumulative_sqnr_db, op.output_sqnr_db) for op in report.ops
    }
    assert found.keys() == expected.keys()
    for node, figures in expected.items():
        # float32 runs against float64 sums: 1e-3 dB is a 0.02% relative error in the noise
        assert found[node] == pytest.approx(figures, abs=1e-3), node
    assert found["second"][1] < found["second"][0], "upstream error only adds"
    assert report.outputs["y"] == pytest.approx(found["second"][1], abs=1e-3)
    ranked = [op.output_sqnr_db for op in report.ops]
    assert ranked == sorted(ranked), "worst impact at the output first"


def test_without_impact_runs_the_local_sqnr_ranks(chain):
    batches = data()
    report = debug_accuracy(qgraph.load(chain), compiled(chain, batches), batches, impact_batches=0)
    assert all(op.output_sqnr_db is None for op in report.ops)
    assert [op.rank_key for op in report.ops] == sorted(op.local_sqnr_db for op in report.ops)


def test_the_worst_op_is_ranked_first_and_its_exclusion_recompiles_in_float(chain, tmp_path):
    batches = data(outlier=True)
    model = compiled(chain, batches)
    report = debug_accuracy(qgraph.load(chain), model, batches)
    assert report.ops[0].node == "first", "x's outlier makes its 8-bit steps coarse"
    path = tmp_path / "keep.toml"
    chosen = write_exclusions(report, 1, path, "a test")
    assert [op.node for op in chosen] == ["first"]
    assert load_recipe(path)["exclude_node"] == ["first"]
    options = CompileOptions(quantization=quant_options(load_recipe(path), calib=batches))
    result = qgraph.compile_model(chain, "x86-avx2", options=options)
    annotate = next(r for r in result.records if r.name == "annotate").details
    assert annotate.float_reasons["first"][1] == "excluded by the user (pattern 'first')"


def test_names_with_regex_characters_are_escaped(chain, tmp_path):
    batches = data()
    chain.graph.node[0].name = "/layers.0/mlp/MatMul"
    report = debug_accuracy(qgraph.load(chain), compiled(chain, batches), batches)
    first = next(op for op in report.ops if op.node.startswith("/layers"))
    report.ops.remove(first)
    report.ops.insert(0, first)
    path = tmp_path / "keep.toml"
    write_exclusions(report, 1, path, "a test")
    assert load_recipe(path)["exclude_node"] == [r"/layers\.0/mlp/MatMul"]


def test_a_qoperator_model_is_refused_with_the_remedy(chain):
    batches = data()
    options = CompileOptions(
        quantization=quant_options(calib=batches, budget="none"), format=QuantFormat.QOPERATOR
    )
    lowered = qgraph.compile_model(chain, "x86-avx2", options=options).model
    with pytest.raises(DebugError, match="compile with --format qdq"):
        debug_accuracy(qgraph.load(chain), lowered, batches)
