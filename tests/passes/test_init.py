"""qgraph.passes (its ``__init__``): the pipeline table is complete, ordered and consistent."""

from __future__ import annotations

import importlib

from qgraph.passes import ORDER, PIPELINE
from qgraph.pipeline import Phase, Pipeline


def test_every_row_has_a_builder_and_every_builder_a_row():
    modules = {info.build for info in PIPELINE}
    built = {
        name
        for module in modules
        for name in importlib.import_module(f"qgraph.passes.{module}").BUILDERS
    }
    assert built == {info.name for info in PIPELINE}


def test_rows_are_in_phase_order_with_unique_names():
    order = list(Phase)
    phases = [order.index(info.phase) for info in PIPELINE]
    assert phases == sorted(phases)
    names = [info.name for info in PIPELINE]
    assert len(names) == len(set(names))


def test_every_row_says_why_it_is_there():
    assert all(info.why and info.summary for info in PIPELINE)


def test_each_required_fact_is_ensured_by_an_earlier_row():
    ensured: set[str] = set()
    for info in PIPELINE:
        assert info.requires <= ensured, info.name
        ensured |= info.ensures


def test_ordering_constraints_name_passes_of_the_table_and_hold_in_it():
    names = [info.name for info in PIPELINE]
    for rule in ORDER:
        assert names.index(rule.first) < names.index(rule.then), rule


def test_the_whole_table_fits_a_checked_pipeline():
    class Nothing(importlib.import_module("onnx_ir").passes.InPlacePass):
        def call(self, model):
            raise AssertionError("not run")

    pipeline = Pipeline(ORDER)
    for info in PIPELINE:
        pipeline.add(
            Nothing(), info.phase, name=info.name, requires=info.requires, ensures=info.ensures
        )
    assert pipeline.names() == [info.name for info in PIPELINE]
