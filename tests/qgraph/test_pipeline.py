"""qgraph.pipeline: phase order, user passes at named phases, records and provenance."""

from __future__ import annotations

import itertools
import time

import onnx_ir as ir
import pytest
from onnx import helper

import qgraph
from qgraph.errors import PipelineError
from qgraph.options import CompileOptions
from qgraph.passes import ORDER, Fact
from qgraph.pipeline import PROVENANCE_KEY, Before, Phase, Pipeline
from qgraph.recipe import quant_options

SLEEP_SECONDS = 0.05


class AppendNeg(ir.passes.InPlacePass):
    """Negates the graph output twice (a float-equivalent rewrite that adds two nodes)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        old = graph.outputs[0]
        first = ir.node("Neg", [old], name="neg1")
        second = ir.node("Neg", [first.outputs[0]], name="neg2")
        graph.extend([first, second])
        second.outputs[0].name = old.name
        old.name = old.name + "_inner"
        second.outputs[0].type, second.outputs[0].shape = old.type, old.shape
        graph.outputs[0] = second.outputs[0]
        return ir.passes.PassResult(model, modified=True)


class Nothing(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


class Sleeps(ir.passes.InPlacePass):
    """Takes at least ``SLEEP_SECONDS`` and changes nothing."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        time.sleep(SLEEP_SECONDS)
        return ir.passes.PassResult(model, modified=False)


class Explodes(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ValueError("boom")


def test_passes_run_in_phase_order_whatever_the_order_they_were_added():
    pipeline = (
        Pipeline()
        .add(Nothing(), "finalize", name="f")
        .add(Nothing(), Phase.CANONICALIZE, name="c1")
        .add(Nothing(), "lower", name="l")
        .add(Nothing(), "canonicalize", name="c2")
        .add(Nothing(), "canonicalize", name="c0", first=True)
    )
    assert pipeline.names() == ["c0", "c1", "c2", "l", "f"]


def test_user_pass_at_a_named_phase_of_a_target_pipeline(small_model):
    pipeline = qgraph.build_pipeline("x86-avx2").add(AppendNeg(), "float-rewrites", name="negneg")
    names = pipeline.names()
    assert (
        names.index("dead-code-elimination") < names.index("negneg") < names.index("remove-unused")
    )
    result = pipeline.run(qgraph.load(small_model))
    record = next(r for r in result.records if r.name == "negneg")
    assert record.phase is Phase.FLOAT_REWRITES
    assert record.modified and record.nodes_after == record.nodes_before + 2
    assert [n.op_type for n in result.model.graph][-2:] == ["Neg", "Neg"]


def test_a_record_times_its_own_pass(small_model):
    pipeline = Pipeline().add(Nothing(), "canonicalize", name="quick")
    pipeline.add(Sleeps(), "float-rewrites", name="slow")
    quick, slow = pipeline.run(qgraph.load(small_model)).records
    assert slow.seconds >= SLEEP_SECONDS > quick.seconds


def test_records_chain_node_counts_and_flag_modification(small_model):
    result = qgraph.build_pipeline("x86-avx2").run(qgraph.load(small_model))
    assert [r.name for r in result.records] == qgraph.build_pipeline("x86-avx2").names()
    for earlier, later in itertools.pairwise(result.records):
        assert later.nodes_before == earlier.nodes_after
    checker = next(r for r in result.records if r.name == "onnx-checker")
    assert not checker.modified


def test_nodes_created_by_a_pass_carry_its_name(small_model):
    pipeline = Pipeline().add(AppendNeg(), "float-rewrites", name="negneg")
    model = pipeline.run(qgraph.load(small_model)).model
    stamps = {n.name: n.metadata_props.get(PROVENANCE_KEY) for n in model.graph}
    assert stamps == {"matmul": None, "add": None, "relu": None, "neg1": "negneg", "neg2": "negneg"}


def test_a_failing_pass_is_named_in_the_error(small_model):
    pipeline = Pipeline().add(Explodes(), "lower", name="exploder")
    with pytest.raises(PipelineError, match=r"pass 'exploder' \(lower\) failed: ValueError: boom"):
        pipeline.run(qgraph.load(small_model))


def test_pipeline_misuse_is_reported():
    with pytest.raises(PipelineError, match=r"unknown phase 'quantize'.*canonicalize"):
        Pipeline().add(Nothing(), "quantize")
    with pytest.raises(PipelineError, match="not an onnx_ir pass"):
        Pipeline().add(lambda model: model, "lower")
    with pytest.raises(PipelineError, match="already has a pass named 'x'"):
        Pipeline().add(Nothing(), "lower", name="x").add(Nothing(), "finalize", name="x")
    with pytest.raises(PipelineError, match="no pass named 'y'"):
        Pipeline().remove("y")


def test_remove_drops_a_pass():
    pipeline = qgraph.build_pipeline("arm64").remove("common-subexpression-elimination")
    assert "common-subexpression-elimination" not in pipeline.names()


def test_listener_hears_every_pass_in_order(small_model):
    heard = []
    pipeline = qgraph.build_pipeline("tensorrt")
    pipeline.run(qgraph.load(small_model), listener=lambda phase, name: heard.append(name))
    assert heard == pipeline.names()


def test_an_unchanged_graph_reports_no_modification(make_model):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], {"x": [3]}, {"y": [3]})
    result = Pipeline().add(Nothing(), "lower", name="n").run(qgraph.load(proto))
    assert not result.modified


def test_an_ordering_constraint_refuses_a_pass_added_on_the_wrong_side():
    rule = Before("a", "b", "a makes what b reads")
    with pytest.raises(PipelineError, match=r"'a'.*must run before 'b' \(a makes what b reads\)"):
        Pipeline([rule]).add(Nothing(), "lower", name="b").add(Nothing(), "lower", name="a")
    with pytest.raises(PipelineError, match=r"'b'.*must run after 'a'"):
        Pipeline([rule]).add(Nothing(), "lower", name="a").add(
            Nothing(), "lower", name="b", first=True
        )
    pipeline = Pipeline([rule]).add(Nothing(), "lower", name="b")
    assert pipeline.add(Nothing(), "lower", name="a", first=True).names() == ["a", "b"]


def test_a_pass_cannot_run_before_the_pass_ensuring_what_it_requires():
    made = Pipeline().add(Nothing(), "lower", name="maker", ensures={"fact"})
    with pytest.raises(PipelineError, match="requires 'fact' and would run before 'maker'"):
        made.add(Nothing(), "lower", name="reader", requires={"fact"}, first=True)
    read = Pipeline().add(Nothing(), "lower", name="reader", requires={"fact"})
    with pytest.raises(PipelineError, match="ensures 'fact' and would run after 'reader'"):
        read.add(Nothing(), "lower", name="maker", ensures={"fact"})


def test_a_plugin_pass_is_checked_against_the_built_in_table():
    options = CompileOptions(quantization=quant_options(mode="dynamic"))
    pipeline = qgraph.build_pipeline("x86-avx2", options)
    with pytest.raises(PipelineError, match="requires 'annotated' and would run before 'annotate'"):
        pipeline.add(Nothing(), "float-rewrites", name="early", requires={Fact.ANNOTATED})
    pipeline.add(Nothing(), "lower", name="late", requires={Fact.ANNOTATED})


def test_smoothquant_stays_before_rotation():
    pipeline = Pipeline(ORDER).add(Nothing(), "float-rewrites", name="rotation")
    with pytest.raises(PipelineError, match="must run before 'rotation'"):
        pipeline.add(Nothing(), "float-rewrites", name="smoothquant")
