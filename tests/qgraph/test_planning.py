"""The accuracy plan: all candidates in 8 bits, then the fewest kept in float, by error per
unit of work, that the output-SQNR budget needs; each claim measured in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import planning
from qgraph.options import CompileOptions
from qgraph.recipe import RecipeError, quant_options

K = 256  # large enough that int8 is faster here than float (measured by the plan)
ROWS = 128
RNG = np.random.default_rng(0)
W_QUIET = (RNG.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
W_LOUD = (RNG.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)


def two_branches() -> onnx.ModelProto:
    """a = Relu(x) W_quiet and b = z W_loud, where one channel of ``z`` is 300x the others: 8
    bits per tensor leave its other channels a few steps each and its MatMul far noisier.
    (Their sum, a 2-D ``MatMul + Add``, onnxruntime would fuse into a float Gemm first.)"""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W_quiet"], ["a"], name="quiet"),
        helper.make_node("MatMul", ["z", "W_loud"], ["b"], name="loud"),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [ROWS, K]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [ROWS, K]) for name in "ab"],
        [numpy_helper.from_array(W_QUIET, "W_quiet"), numpy_helper.from_array(W_LOUD, "W_loud")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(count: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    spike = np.ones(K, np.float32)
    spike[0] = 300.0
    return [
        {
            "x": rng.standard_normal((ROWS, K)).astype(np.float32),
            "z": (rng.standard_normal((ROWS, K)) * spike).astype(np.float32),
        }
        for _ in range(count)
    ]


def compiled(budget) -> qgraph.CompileResult:
    flags = {"calib": batches(), "budget": budget, "smoothquant": "none"}
    options = CompileOptions(quantization=quant_options(**flags))
    return qgraph.compile_model(two_branches(), "x86-vnni", options=options)


def measured_sqnr(model) -> float:
    sample = planning.plan_batches(batches())
    expected = planning.reference_outputs(qgraph.load(two_branches()), sample)
    return planning.output_sqnr_db(expected, model, sample)


def test_without_a_budget_every_candidate_is_quantized():
    result = compiled("none")
    assert result.plan is None
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert inserted.quantized["MatMul"] == 2


def test_the_plan_keeps_only_the_noisy_op_in_float_and_meets_the_budget():
    everything = measured_sqnr(compiled("none").model)
    result = compiled(everything + 8)
    report = result.plan
    assert report.all_quantized_db == pytest.approx(everything, abs=0.01)
    assert [op.node for op in report.kept_float] == ["loud"]
    assert report.final_db >= report.budget_db
    assert measured_sqnr(result.model) == pytest.approx(report.final_db, abs=0.01)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    op, reason = annotate.float_reasons["loud"]
    assert op == "MatMul" and reason.startswith("kept in float by the accuracy plan")
    assert "quiet" not in annotate.float_reasons


def test_a_budget_the_quantized_model_meets_changes_nothing():
    everything = measured_sqnr(compiled("none").model)
    report = compiled(max(everything - 3, 0)).plan
    assert report.kept_float == () and report.rounds == 1
    assert "met with every candidate in 8 bits" in report.summary()


def test_an_unreachable_budget_keeps_every_candidate_float():
    result = compiled(100)
    assert sorted(op.node for op in result.plan.kept_float) == ["loud", "quiet"]
    assert result.plan.final_db == float("inf")


def cost(name: str, sqnr_db: float, macs: int) -> planning.OpCost:
    return planning.OpCost(name, "MatMul", sqnr_db, macs)


def test_the_shortest_prefix_removing_the_needed_noise_counts_scaled_errors():
    # alone: 0.01 + 0.001 + 0.0001 = 0.0111 of noise, measured all together: 0.0222 (x2)
    order = [cost("a", 20, 1), cost("b", 30, 1), cost("c", 40, 1)]
    assert planning._ops_covering(order, total=0.0222, needed=0.015) == 1
    assert planning._ops_covering(order, total=0.0222, needed=0.021) == 2
    assert planning._ops_covering(order, total=0.0222, needed=1.0) == 3


def test_rounds_double_until_one_passes_then_bisect():
    assert planning._next_count(failing=3, passing=None, total=100) == 6
    assert planning._next_count(failing=0, passing=None, total=100) == 1
    assert planning._next_count(failing=60, passing=None, total=100) == 100
    assert planning._next_count(failing=3, passing=6, total=100) == 4


def test_budgets_read_from_flags_and_recipes():
    assert quant_options(budget="none").budget is None
    assert quant_options(budget="18.5").budget == 18.5
    assert quant_options({"budget": 30}).budget == 30.0
    with pytest.raises(RecipeError, match="budget = 'loose'"):
        quant_options(budget="loose")


def test_a_budget_not_met_with_every_candidate_float_is_an_error():
    """The embedding table stays 8-bit (it is no candidate), so 100 dB is out of reach."""
    table = RNG.standard_normal((64, K)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
            helper.make_node("MatMul", ["x", "W_quiet"], ["y"], name="mm"),
        ],
        "embedded",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, K])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(W_QUIET, "W_quiet")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(2)
    data = [{"ids": rng.integers(0, 64, 8).astype(np.int64)} for _ in range(3)]
    options = CompileOptions(quantization=quant_options(calib=data, budget=100))
    with pytest.raises(planning.BudgetError, match="budget of 100 dB cannot be met"):
        qgraph.compile_model(proto, "x86-vnni", options=options)


def test_an_op_int8_makes_slower_stays_float_whatever_the_budget(monkeypatch):
    monkeypatch.setattr(planning, "_gains", lambda *args: {"quiet": -1e-4, "loud": 2e-3})
    result = compiled(0)
    assert [op.node for op in result.plan.kept_float] == ["quiet"]
    annotate = next(r.details for r in result.records if r.name == "annotate")
    assert (
        "in 8 bits it ran slower here (0.100 ms more, measured)"
        in annotate.float_reasons["quiet"][1]
    )
