"""The accuracy plan: all candidates in 8 bits, then the fewest kept in float, by error per
unit of work, that the budget (output SQNR, or a metric's figure) needs; each claim measured
in onnxruntime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import compiler, evaluation, planning, timing
from qgraph.budget import COSINE, DEFAULT_BUDGETS, DEFAULT_SQNR_DB, SQNR, Budget
from qgraph.options import CompileOptions
from qgraph.recipe import RecipeError, quant_options
from qgraph.targets import QuantFormat
from qgraph.verify import run

K = 256  # int8 pays at this width by the cost model (``measure=False``: the same on any host)
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


VNNI = qgraph.get_target("x86-vnni")
FLOAT_ONLY = dataclasses.replace(
    VNNI, activations=dataclasses.replace(VNNI.activations, int16_digits=False)
)
"""x86-vnni without 16-bit activations as digits: what the plan keeps out of 8 bits stays
float (the 16-bit rung has its own tests)."""


def compiled(budget, measure: bool = False, target=FLOAT_ONLY) -> qgraph.CompileResult:
    flags = {"calib": batches(), "budget": budget, "smoothquant": "none"}
    if budget != "none":
        flags["measure"] = measure
    options = CompileOptions(quantization=quant_options(**flags))
    return qgraph.compile_model(two_branches(), target, options=options)


def measured_sqnr(model) -> float:
    sample = planning.plan_sample(batches()).batches
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
    assert report.all_quantized == pytest.approx(everything, abs=0.01)
    assert [op.node for op in report.kept_float] == ["loud"]
    assert report.budget.met(report.final) and report.final >= everything + 8
    assert measured_sqnr(result.model) == pytest.approx(report.final, abs=0.01)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    op, reason = annotate.float_reasons["loud"]
    assert op == "MatMul" and reason.startswith("kept in float by the accuracy plan")
    assert "quiet" not in annotate.float_reasons


def test_an_op_kept_out_of_8_bits_gets_a_16_bit_activation_where_that_meets_the_budget():
    """On a target that runs 16-bit activations as two 8-bit digits, the loud MatMul's
    activation goes to 16 bits instead of float: its error is then its weight's alone, and it
    runs as two integer products (the cost model: two 8-bit products beat float at K = 256)."""
    everything = measured_sqnr(compiled("none").model)
    float_kept = compiled(everything + 8)
    result = compiled(everything + 8, target=VNNI)
    report = result.plan
    assert report.kept_float == () and [op.node for op in report.wide] == ["loud"]
    assert report.budget.met(report.final)
    assert measured_sqnr(result.model) == pytest.approx(report.final, abs=0.01)
    assert "1 of them with 16-bit activations (two 8-bit digits" in report.summary()
    ops = [node.op_type for node in result.model.graph]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("MatMul") == 1
    kernels = qgraph.kernels.runtime_kernels(result.model)
    assert kernels.complete, kernels.summary()
    assert report.gain_share > float_kept.plan.gain_share


def test_the_16_bit_rung_is_not_taken_where_it_misses_the_budget():
    result = compiled(100, target=VNNI)
    assert sorted(op.node for op in result.plan.kept_float) == ["loud", "quiet"]
    assert result.plan.wide == ()
    assert "16-bit activations for" in result.plan.sixteen_bit


def test_the_ops_kept_in_float_store_their_weights_in_8_bits_where_the_budget_holds():
    """The loud MatMul stays float for its activation; its weight alone in 8 bits costs the
    outputs little, so it is stored in 8 bits and expanded once, at load: float compute, a
    4x smaller weight (``passes/stored_weights.py``)."""
    everything = measured_sqnr(compiled("none").model)
    result = compiled(everything + 8)
    report = result.plan
    assert [op.node for op in report.kept_float] == ["loud"]
    assert "the weights of 1 op kept in float stored in 8 bits" in report.summary()
    assert report.budget.met(report.final)
    assert measured_sqnr(result.model) == pytest.approx(report.final, abs=0.01)
    loud = next(node for node in result.model.graph if node.name == "loud")
    expansion = loud.inputs[1].producer()
    assert expansion.op_type == "Mul"
    assert expansion.inputs[0].producer().inputs[0].dtype == ir.DataType.INT8
    stored = next(r.details for r in result.records if r.name == "store-float-weights")
    assert stored.stored == ("loud",)


def test_weights_stay_float_where_8_bits_miss_the_budget():
    result = compiled(100)
    assert sorted(op.node for op in result.plan.kept_float) == ["loud", "quiet"]
    assert "8-bit stored weights for the ops kept in float (with 2: " in result.plan.storage
    assert "not stored" in result.plan.storage
    assert "Cast" not in [node.op_type for node in result.model.graph]
    assert measured_sqnr(result.model) == float("inf")


S = 8
"""The width of a MatMul too small for int8 to pay by the cost model: ``N (1 - 1/r) < 16``."""


def three_ops() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """``two_branches`` with ``W_loud`` 400x larger in its second row, so that 8 bits per output
    channel round the rest of each column coarsely, and a third MatMul of width ``S``, kept
    float for speed; and its batches."""
    model = two_branches()
    loud = W_LOUD.copy()
    loud[1] *= 400
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(loud, "W_loud"))
    small = (RNG.standard_normal((S, S)) / np.sqrt(S)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(small, "W_small"))
    model.graph.node.append(helper.make_node("MatMul", ["s", "W_small"], ["c"], name="small"))
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [ROWS, S]))
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [ROWS, S]))
    rng = np.random.default_rng(2)
    data = [{**b, "s": 20 * rng.standard_normal((ROWS, S)).astype(np.float32)} for b in batches()]
    return model, data


def test_where_every_float_op_s_weight_in_8_bits_misses_the_budget_those_kept_for_speed_go():
    """The loud MatMul, float for its activation, has a weight 8 bits cannot hold; the small
    one, float for its speed, has one they can: the second tier stores the small one only."""
    model, data = three_ops()
    options = CompileOptions(
        quantization=quant_options(calib=data, budget=40, smoothquant="none", measure=False)
    )
    report = qgraph.compile_model(model, FLOAT_ONLY, options=options)
    kept = {op.node: op.slower for op in report.plan.kept_float}
    assert kept == {"loud": False, "small": True}
    assert report.plan.storage.startswith("the weights of 1 op kept in float stored in 8 bits")
    assert "(with 2: " in report.plan.storage
    stored = next(r.details for r in report.records if r.name == "store-float-weights")
    assert stored.stored == ("small",)
    sample = planning.plan_sample(data).batches
    expected = planning.reference_outputs(qgraph.load(model), sample)
    assert planning.output_sqnr_db(expected, report.model, sample) == pytest.approx(
        report.plan.final, abs=0.01
    )
    assert report.plan.budget.met(report.plan.final)


def test_a_budget_the_quantized_model_meets_changes_nothing():
    everything = measured_sqnr(compiled("none").model)
    report = compiled(max(everything - 3, 0)).plan
    assert report.kept_float == () and report.rounds == 1
    assert "met with every candidate in 8 bits" in report.summary()


def test_an_unreachable_budget_keeps_every_candidate_float():
    result = compiled(100)
    assert sorted(op.node for op in result.plan.kept_float) == ["loud", "quiet"]
    assert result.plan.final == float("inf")


def test_smoothing_is_undone_where_the_plan_keeps_every_reader_float():
    """Both tensors smoothed (``z / s`` through an inserted Mul), then both readers kept float
    by a budget nothing but float meets: the model must be the float one, bit for bit, not
    one with a Mul and rescaled weights."""
    options = CompileOptions(
        quantization=quant_options(calib=batches(), budget=100, smoothquant=0.5, measure=False)
    )
    result = qgraph.compile_model(two_branches(), "x86-vnni", options=options)
    smoothed = next(r.details for r in result.records if r.name == "smoothquant")
    assert smoothed.smoothed == [] and len(result.plan.kept_float) == 2
    assert [node.op_type for node in result.model.graph] == ["Relu", "MatMul", "MatMul"]
    feeds = batches(1, seed=7)[0]
    expected_outputs = run(two_branches().SerializeToString(), feeds)
    for got, expected in zip(run(result.model, feeds), expected_outputs, strict=True):
        np.testing.assert_array_equal(got, expected)


def searched(alone: list[float], noise, allowed: float) -> tuple[int | None, list[int]]:
    """Run ``CountSearch`` against the noise curve ``noise(count)``: (answer, counts tried)."""
    search = planning.CountSearch(alone, noise(0), allowed)
    tried = []
    while (count := search.next_count()) is not None:
        assert count not in tried, "a count measured twice"
        tried.append(count)
        search.record(count, noise(count))
    return search.passing, tried


def test_the_first_guess_scales_the_alone_errors_to_the_measured_noise():
    # alone: 0.01 + 0.001 + 0.0001 = 0.0111, measured all together: 0.0222 (x2)
    search = planning.CountSearch([0.01, 0.001, 0.0001], measured=0.0222, allowed=0.0072)
    assert search.next_count() == 1  # removes 2 x 0.01 = 0.02 >= 0.015 needed
    search = planning.CountSearch([0.01, 0.001, 0.0001], measured=0.0222, allowed=0.0012)
    assert search.next_count() == 2


def test_the_search_finds_the_smallest_passing_count_in_few_rounds():
    """A convex curve (the first ops kept in float remove more than their alone share): the
    answer passes, is within the tolerance of the smallest passing count, and takes at most
    the plan's rounds. (Here it takes 3 to 5; the doubling and bisection it replaces took 5,
    and 8, the most the plan allowed, for the three tighter budgets.)"""
    rng = np.random.default_rng(3)
    alone = sorted(rng.exponential(1e-3, 200), reverse=True)
    cumulative = np.concatenate([[0.0], np.cumsum(alone)])

    def noise(count: int) -> float:
        share = cumulative[count] / cumulative[-1]
        return 0.05 * (1 - share) ** 1.5

    for allowed in (0.04, 0.01, 0.002, 2e-4):
        answer, tried = searched(alone, noise, allowed)
        smallest = next(c for c in range(201) if noise(c) <= allowed)
        assert smallest <= answer <= smallest + 200 * planning.CountSearch.TOLERANCE
        assert len(tried) <= planning.MAX_ROUNDS - 1, (allowed, tried)


def test_the_search_stops_when_even_every_op_in_float_fails():
    answer, tried = searched([1e-3] * 10, lambda count: 1.0 - count * 1e-3, allowed=0.5)
    assert answer is None and tried[-1] == 10


def test_budgets_read_from_flags_and_recipes():
    assert quant_options(budget="none").budget is None
    assert quant_options(budget="18.5").budget == Budget(SQNR, 18.5)
    assert quant_options({"budget": 30}).budget == Budget(SQNR, 30.0)
    with pytest.raises(RecipeError, match="budget 'loose'"):
        quant_options(budget="loose")


def test_a_budget_out_of_reach_with_the_tables_in_8_bits_keeps_them_float():
    """The embedding table is no candidate, so with it in 8 bits 100 dB is out of reach even
    with every candidate float: the plan runs again with the table float, and says why."""
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
    result = qgraph.compile_model(proto, "x86-vnni", options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    assert annotate.float_reasons["embed"] == ("Gather", planning.TABLE_FOR_BUDGET)
    assert result.plan.budget.met(result.plan.final)


def test_an_op_int8_makes_slower_stays_float_whatever_the_budget(monkeypatch):
    speeds = [
        planning.OpCost("quiet", "MatMul", np.inf, -1e-4, 1e-3),
        planning.OpCost("loud", "MatMul", np.inf, 2e-3, 3e-3),
    ]
    monkeypatch.setattr(compiler, "speed_gains", lambda *args: speeds)
    result = compiled(0)
    assert [op.node for op in result.plan.kept_float] == ["quiet"]
    annotate = next(r.details for r in result.records if r.name == "annotate")
    assert (
        "in 8 bits it ran slower here (0.100 ms more, measured)"
        in annotate.float_reasons["quiet"][1]
    )


def test_an_op_at_the_same_speed_in_8_bits_is_quantized_for_its_size(monkeypatch):
    """1% slower is the timings' noise (``SAME_SPEED``): 4x smaller weights for nothing."""
    speeds = [
        planning.OpCost("quiet", "MatMul", np.inf, -1e-5, 1e-3),
        planning.OpCost("loud", "MatMul", np.inf, -1e-4, 1e-3),
    ]
    monkeypatch.setattr(compiler, "speed_gains", lambda *args: speeds)
    result = compiled(0)
    assert [op.node for op in result.plan.kept_float] == ["loud"]
    inserted = next(r.details for r in result.records if r.name == "insert-qdq")
    assert inserted.quantized["MatMul"] == 1


def test_an_op_at_the_same_speed_goes_float_first_only_if_far_noisier(monkeypatch):
    """``quiet`` runs as fast in 8 bits, ``loud`` 30% faster: the budget that needs ``loud``
    float (its error alone is ~1000x ``quiet``'s, over the 30x their worths differ) keeps it,
    and leaves ``quiet`` quantized; with the worths the other way round, the same."""
    everything = measured_sqnr(compiled("none").model)
    for quiet_gain, loud_gain in ((0.0, 3e-4), (3e-4, 0.0)):
        speeds = [
            planning.OpCost("quiet", "MatMul", np.inf, quiet_gain, 1e-3),
            planning.OpCost("loud", "MatMul", np.inf, loud_gain, 1e-3),
        ]
        monkeypatch.setattr(compiler, "speed_gains", lambda *args, speeds=speeds: speeds)
        report = compiled(everything + 8).plan
        assert [op.node for op in report.kept_float] == ["loud"], (quiet_gain, loud_gain)


def test_without_measuring_the_plan_estimates_and_says_so(monkeypatch):
    monkeypatch.setattr(timing, "measure", None)  # a timing would fail
    result = compiled(0, measure=False)
    assert result.plan.kept_float == ()
    vnni = qgraph.get_target("x86-vnni")
    narrow = dataclasses.replace(
        vnni, kernels=dataclasses.replace(vnni.kernels, nominal_int8_speedup=1.0)
    )
    options = CompileOptions(
        quantization=quant_options(calib=batches(), budget=0, smoothquant="none", measure=False)
    )
    result = qgraph.compile_model(two_branches(), narrow, options=options)
    reasons = result.plan.kept_reasons()
    assert sorted(reasons) == ["loud", "quiet"]
    assert all("would run slower here" in r and "estimated" in r for r in reasons.values())


def test_no_measure_without_a_plan_is_an_error():
    with pytest.raises(RecipeError, match="no plan runs here"):
        quant_options(calib=batches(), budget="none", measure=False)


@pytest.mark.parametrize(
    "flags",
    [{"budget": "none"}, {"measure": False}],
    ids=["no plan", "not measured"],
)
def test_threads_where_no_plan_times_the_whole_model_is_an_error(flags):
    """``threads`` only sets where the plan's whole-model check times: accepted and ignored
    elsewhere, it would promise a speed nothing measured."""
    with pytest.raises(RecipeError, match=r"threads = 0 \(--threads\) .* no plan times it"):
        quant_options(calib=batches(), threads=0, **flags)


def test_a_target_that_is_not_this_hosts_cpu_is_estimated_not_timed(monkeypatch):
    """Timings taken here say nothing of TensorRT's kernels."""
    monkeypatch.setattr(timing, "measure", None)  # a timing would fail
    flags = {"calib": batches(), "budget": 0, "smoothquant": "none"}
    options = CompileOptions(quantization=quant_options(**flags))
    report = qgraph.compile_model(two_branches(), "tensorrt", options=options).plan
    assert not report.gains_measured and "estimated, not timed" in report.summary()


def joined() -> onnx.ModelProto:
    """``two_branches`` with its outputs side by side in one, ``y = [a, b]``: what the
    embedding metric reads (the first output, row by row)."""
    model = two_branches()
    model.graph.node.append(helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="join"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, 2 * K]))
    return model


def joined_result(**flags) -> qgraph.CompileResult:
    flags = {"calib": batches(), "smoothquant": "none", **flags}
    if flags.get("budget") != "none":
        flags["measure"] = False
    options = CompileOptions(quantization=quant_options(**flags))
    return qgraph.compile_model(joined(), FLOAT_ONLY, options=options)


def mean_cosine(model, data: list[dict[str, np.ndarray]]) -> float:
    metric = evaluation.EmbeddingSimilarity()
    reference, candidate = qgraph.load(joined()), qgraph.load(model)
    for feeds in data:
        metric.update(feeds, run(reference, feeds), run(candidate, feeds, optimize=True))
    return metric.result()["mean_cosine"]


def test_a_cosine_budget_is_measured_as_the_embedding_metric_measures_it():
    sample = planning.plan_sample(batches()).batches
    everything = mean_cosine(joined_result(budget="none").model, sample)
    loud_float = mean_cosine(joined_result(budget="none", exclude_node=["loud"]).model, sample)
    assert everything < loud_float < 1
    bound = round((everything + loud_float) / 2, 6)
    result = joined_result(budget=f"cosine>={bound}")
    report = result.plan
    assert report.budget == Budget(COSINE, bound)
    assert report.all_quantized == pytest.approx(everything, abs=1e-6)
    assert [op.node for op in report.kept_float] == ["loud"]
    assert report.final == pytest.approx(mean_cosine(result.model, sample), abs=1e-6)
    assert f"accuracy budget mean cosine >= {bound:.4f}" in report.summary()
    assert "on 2 calibration batches" in report.summary()


def test_the_plan_measures_its_budget_on_every_batch_of_the_eval_data():
    held_out = batches(count=4, seed=7)
    result = joined_result(budget="cosine>=0.9", plan_data=held_out)
    assert "on 4 batches of the --eval data" in result.plan.summary()
    everything = mean_cosine(joined_result(budget="none").model, held_out)
    assert result.plan.all_quantized == pytest.approx(everything, abs=1e-6)


def test_without_a_budget_the_eval_datas_metric_picks_it(tmp_path):
    (tmp_path / "dataset.json").write_text('{"metric": "embedding"}')
    options = quant_options(calib=batches(), plan_data=tmp_path)
    assert options.budget == DEFAULT_BUDGETS["embedding"]
    assert quant_options(calib=batches()).budget == Budget(SQNR, DEFAULT_SQNR_DB)


def test_eval_data_without_a_plan_is_an_error():
    with pytest.raises(RecipeError, match=r"plan_data \(--eval\) .* no plan runs here"):
        quant_options(calib=batches(), budget="none", plan_data=batches())


@pytest.mark.parametrize(
    ("rows", "count", "expected"),
    [(8, 5, 2), (1, 20, 8), (3, 20, 3), (1, 4, 4)],
    ids=["two batches hold enough", "one row each", "rounds up", "fewer than asked"],
)
def test_without_eval_data_the_plan_reads_batches_until_they_hold_enough_rows(
    rows, count, expected
):
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((rows, K)).astype(np.float32)} for _ in range(count)]
    sample = planning.plan_sample(calib)
    assert len(sample.batches) == expected
    assert sample.description == f"{expected} calibration batches"


@pytest.fixture(scope="module")
def decoder():
    from qgraph import models

    return models.fetch("reference-decoder")


def planned_decoder(decoder, target: str, budget) -> qgraph.CompileResult:
    """The reference decoder (outlier channels in its residual stream) under the plan, int8
    gains estimated (the same on any host), ``rotate`` left to the plan, no SmoothQuant
    (which alone lifts it to 30 dB, as much as rotation)."""
    flags = {"calib": str(decoder.calibration), "budget": budget, "measure": False}
    flags["smoothquant"] = "none"
    options = CompileOptions(quantization=quant_options(**flags))
    assert options.quantization.rotate == "auto"
    return qgraph.compile_model(decoder.model, target, options=options)


def test_the_plan_rotates_where_only_rotation_meets_the_budget_with_every_op_in_8_bits(
    decoder, monkeypatch
):
    """Every MatMul in 8 bits gives about 5 dB plain and 35 rotated: a 25 dB budget is met
    rotated, with nothing kept float, and the model meets it.
    The online rotations are taken to cost 0.1 ms, as little as SmolLM2's Hadamards cost next
    to its MatMuls (this decoder's 704-wide one is a dense random rotation, dearer than int8
    saves: the test below)."""
    monkeypatch.setattr(compiler, "float_seconds", lambda *args: 1e-4)
    result = planned_decoder(decoder, "x86-vnni", 25)
    report = result.plan
    assert report.rotation.startswith("rotated: every op in 8 bits gave"), report.rotation
    assert report.budget.met(report.final) and report.all_quantized == report.final
    assert all(op.slower for op in report.kept_float)  # the attention products, here
    assert report.summary().startswith(f"accuracy budget {report.budget} met with every op")
    assert report.rotation in report.summary()
    assert "rotation" in [record.name for record in result.records if record.modified]
    sample = planning.plan_sample(str(decoder.calibration)).batches
    expected = planning.reference_outputs(qgraph.load(decoder.model), sample)
    assert planning.output_sqnr_db(expected, result.model, sample) >= 25


@pytest.mark.parametrize(
    ("target", "budget", "verdict"),
    [
        ("x86-vnni", 3, "not rotated: every op in 8 bits meets the budget unrotated"),
        ("x86-vnni", 25, "not rotated: its float ops would take"),
    ],
    ids=["met unrotated", "int8 saves too little"],
)
def test_the_plan_leaves_the_model_unrotated_and_says_why(decoder, target, budget, verdict):
    """The dense 704 x 704 rotation before the down projection takes 2.75x its multiply-adds,
    more than the cost model's int8 saves on all the MatMuls."""
    result = planned_decoder(decoder, target, budget)
    assert result.plan.rotation.startswith(verdict), result.plan.rotation
    assert "rotation" not in [record.name for record in result.records if record.modified]


def test_a_rotated_model_timed_slower_goes_float_unrotated(decoder, monkeypatch):
    """The plan rotates the decoder (the test above), then the whole model times slower than
    float: every op goes float, and the online rotations, which served only the 8-bit
    MatMuls, go too. Gains estimated as above, but counted as timed on this host, so the
    whole-model check runs (its timing stubbed)."""
    monkeypatch.setattr(compiler, "float_seconds", lambda *args: 1e-4)
    monkeypatch.setattr(compiler, "is_host_target", lambda spec: True)
    monkeypatch.setattr(compiler, "default_cache", timing.CostModel)
    estimated = compiler.speed_gains
    monkeypatch.setattr(
        compiler,
        "speed_gains",
        lambda model, batch, spec, timer: estimated(model, batch, spec, timing.CostModel()),
    )
    monkeypatch.setattr(compiler, "alternating_medians", lambda *args: [1e-3, 1.2e-3])
    flags = {"calib": str(decoder.calibration), "budget": 25, "smoothquant": "none"}
    options = CompileOptions(quantization=quant_options(**flags, measure=True))
    result = qgraph.compile_model(decoder.model, "x86-vnni", options=options)
    report = result.plan
    assert report.whole_model_slower
    assert report.rotation == compiler.UNROTATED_FOR_FLOAT
    assert "rotation" not in [record.name for record in result.records if record.modified]
    assert "QuantizeLinear" not in [node.op_type for node in result.model.graph]
    sample = planning.plan_sample(str(decoder.calibration)).batches
    expected = planning.reference_outputs(qgraph.load(decoder.model), sample)
    assert report.final == np.inf  # its float rewrites are the plan's float reference
    assert planning.output_sqnr_db(expected, result.model, sample) > 100  # vs the raw model


def test_rotate_auto_without_a_plan_is_an_error():
    with pytest.raises(RecipeError, match="rotate = auto lets the accuracy plan decide"):
        quant_options(calib=batches(), budget="none", rotate="auto")
    assert quant_options(calib=batches(), budget="none").rotate is False


@pytest.mark.parametrize(
    ("name", "verdict", "smoothed"),
    [
        ("reference-encoder", "not smoothed: without it every op in 8 bits gave", False),
        ("reference-decoder", "smoothed: without it every op in 8 bits gave", True),
    ],
)
def test_the_plan_smooths_only_where_8_bits_miss_the_budget_without_it(name, verdict, smoothed):
    """``smoothquant = auto`` under the plan (the default): the encoder meets 26 dB with every
    MatMul in 8 bits unsmoothed, so SmoothQuant's inserted Muls stay out; the decoder's outlier
    channels give about 5 dB unsmoothed, so it is smoothed."""
    from qgraph import models

    zoo = models.fetch(name)
    options = CompileOptions(quantization=quant_options(calib=str(zoo.calibration), measure=False))
    assert options.quantization.smoothquant == "auto"
    result = qgraph.compile_model(zoo.model, "x86-vnni", options=options)
    assert result.plan.smoothing.startswith(verdict), result.plan.smoothing
    assert result.plan.smoothing in result.plan.summary()
    assert result.plan.budget.met(result.plan.final)
    modified = [record.name for record in result.records if record.modified]
    assert ("smoothquant" in modified) is smoothed


def lookup_then_matmul(rows: int, ids_shape: tuple[int, int]) -> onnx.ModelProto:
    """``Gather(T [rows, 64], ids) @ W [64, 64]``."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["T", "ids"], ["e"], name="lookup"),
            helper.make_node("MatMul", ["e", "W"], ["y"], name="project"),
        ],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*ids_shape, 64])],
        [
            numpy_helper.from_array(rng.standard_normal((rows, 64)).astype(np.float32), "T"),
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("rows", "ids_shape", "kept"),
    [(8, (16, 512), True), (4096, (1, 8), False)],
    ids=["many rows of a small table", "few rows of a large table"],
)
def test_a_table_stays_float_where_its_rows_cost_more_time_than_its_bytes_save(
    rows, ids_shape, kept
):
    """Cost model: 8192 lookups of a 2 KB table add 4.2 M multiply-add equivalents of
    dequantization to the MatMul's 33.5 M (12.5% of the time, for 8% of the bytes); 8 lookups
    of a 1 MB table add 4096."""
    model = qgraph.load(lookup_then_matmul(rows, ids_shape))
    feeds = {"ids": np.random.default_rng(0).integers(0, rows, ids_shape)}
    macs = int(np.prod(ids_shape)) * 64 * 64
    speeds = [planning.OpCost("project", "MatMul", np.inf, 0.0, macs / 16e9)]
    costs = planning.table_costs(model, feeds, speeds, VNNI, timing.CostModel())
    assert [op.node for op in costs] == (["lookup"] if kept else [])
    assert all(op.slower for op in costs)
    data = [{"ids": np.random.default_rng(s).integers(0, rows, ids_shape)} for s in range(2)]
    options = CompileOptions(quantization=quant_options(calib=data, measure=False))
    result = qgraph.compile_model(lookup_then_matmul(rows, ids_shape), VNNI, options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    assert ("lookup" in annotate.float_reasons) == kept


def test_the_plan_keeps_the_same_ops_float_when_the_output_is_qoperator():
    """The plan times a Q/DQ probe whatever the asked format, so its node names are the
    rounds' and an op it keeps float is found (a QOperator probe renamed them: every op
    stayed quantized and the budget was 'out of reach')."""
    everything = measured_sqnr(compiled("none").model)
    flags = {"calib": batches(), "budget": everything + 8, "smoothquant": "none"}
    options = CompileOptions(
        quantization=quant_options(**flags, measure=False), format=QuantFormat.QOPERATOR
    )
    result = qgraph.compile_model(two_branches(), FLOAT_ONLY, options=options)
    assert [op.node for op in result.plan.kept_float] == ["loud"]
    ops = {node.name: node.op_type for node in result.model.graph}
    assert ops["loud"] == "MatMul" and "MatMulIntegerToFloat" in ops.values()


HOST_FLOAT_ONLY = dataclasses.replace(
    qgraph.get_target("auto"),
    activations=dataclasses.replace(qgraph.get_target("auto").activations, int16_digits=False),
)
"""This host's target without 16-bit digits: its gains count as timed here."""
MATMUL = timing.OpShape("MatMul", ((ROWS, K),), (K, K), (), False)
FASTER_IN_8_BITS = [
    planning.OpCost("quiet", "MatMul", np.inf, 3e-4, 1e-3, shape=MATMUL),
    planning.OpCost("loud", "MatMul", np.inf, 3e-4, 1e-3, shape=MATMUL),
]


def timed_whole(
    monkeypatch,
    float_seconds: float,
    compiled_seconds: float,
    smoothquant="none",
    threads: int = 1,
):
    """Compile ``two_branches`` for this host, each op faster in 8 bits by its timing, the
    whole model timed at ``float_seconds`` in float and ``compiled_seconds`` as compiled, at
    ``threads`` intra-op threads."""
    timed = []

    def medians(models, feeds, runs, at):
        timed.append((at, [{node.op_type for node in model.graph.node} for model in models]))
        return [float_seconds, compiled_seconds]

    monkeypatch.setattr(compiler, "speed_gains", lambda *args: FASTER_IN_8_BITS)
    monkeypatch.setattr(compiler, "alternating_medians", medians)
    flags = {"calib": batches(), "budget": 0, "smoothquant": smoothquant, "threads": threads}
    options = CompileOptions(quantization=quant_options(**flags, measure=True))
    result = qgraph.compile_model(two_branches(), HOST_FLOAT_ONLY, options=options)
    (at, (float_ops, compiled_ops)), *more = timed
    assert not more and "QuantizeLinear" not in float_ops and "QuantizeLinear" in compiled_ops
    assert at == threads
    return result


def test_the_whole_model_timed_faster_keeps_the_plan_and_reports_its_speed(monkeypatch):
    result = timed_whole(monkeypatch, 2e-3, 1e-3)
    assert result.plan.kept_float == ()
    assert "the whole model ran 2.00x its float form here (1.00 ms against 2.00 ms" in (
        result.plan.summary()
    )
    assert "QuantizeLinear" in [node.op_type for node in result.model.graph]


def test_the_whole_model_timed_slower_keeps_every_op_in_float_with_8_bit_stored_weights(
    monkeypatch,
):
    """Each op faster alone, the model slower: the runtime's verdict wins, every op goes float,
    and their weights are still stored in 8 bits where the budget holds."""
    result = timed_whole(monkeypatch, 1e-3, 1.2e-3)
    report = result.plan
    assert sorted(op.node for op in report.kept_float) == ["loud", "quiet"]
    assert report.whole_model_slower and report.gain_share == 0.0
    summary = report.summary()
    assert "every op in float gives" in summary
    assert "every op kept in float: with them in 8 bits the whole model ran slower here" in summary
    assert "(1.20 ms against 1.00 ms in float" in summary
    for reason in report.kept_reasons().values():
        assert "the whole model ran slower with its ops in 8 bits" in reason
    ops = [node.op_type for node in result.model.graph]
    assert "QuantizeLinear" not in ops and ops.count("MatMul") == 2
    stored = next(r.details for r in result.records if r.name == "store-float-weights")
    assert sorted(stored.stored) == ["loud", "quiet"]
    assert measured_sqnr(result.model) == pytest.approx(report.final, abs=0.01)


def test_the_whole_model_is_timed_at_the_threads_it_will_run_at(monkeypatch):
    """``--threads 0``: the model will run on every core, where a small model's int8 ops can
    lose what they gain at one thread (reference-cnn on a 2-core VNNI host: 1.16x at one
    thread, 0.62x on both cores); the check times it there and says so."""
    slower = timed_whole(monkeypatch, 1e-3, 1.2e-3, threads=0)
    assert slower.plan.whole_model_slower
    assert "(1.20 ms against 1.00 ms in float, every core, measured)" in slower.plan.summary()
    faster = timed_whole(monkeypatch, 2e-3, 1e-3, threads=4)
    assert "(1.00 ms against 2.00 ms in float, 4 threads, measured)" in faster.plan.summary()


def test_the_whole_model_within_the_timings_noise_keeps_the_plan(monkeypatch):
    result = timed_whole(monkeypatch, 1e-3, (1 + planning.SAME_SPEED / 2) * 1e-3)
    assert result.plan.kept_float == () and not result.plan.whole_model_slower


def smoothing_muls(model: ir.Model) -> list[str]:
    """The ``Mul`` nodes reading a graph input: SmoothQuant's ``X / s`` on ``z``."""
    inputs = set(model.graph.inputs)
    return [node.name for node in model.graph if node.op_type == "Mul" and node.inputs[0] in inputs]


def test_a_smoothed_model_timed_slower_goes_float_without_its_smoothing(monkeypatch):
    """SmoothQuant's ``X / s`` on ``z`` serves only a quantized reader: with every op in
    float it would only cost time, so the float rewrites run again without it."""
    faster = timed_whole(monkeypatch, 2e-3, 1e-3, smoothquant=0.5)
    assert smoothing_muls(faster.model), "smoothed where the plan keeps its readers quantized"
    slower = timed_whole(monkeypatch, 1e-3, 1.2e-3, smoothquant=0.5)
    assert slower.plan.whole_model_slower
    assert smoothing_muls(slower.model) == []
    assert "QuantizeLinear" not in [node.op_type for node in slower.model.graph]
    assert measured_sqnr(slower.model) == pytest.approx(slower.plan.final, abs=0.01)
