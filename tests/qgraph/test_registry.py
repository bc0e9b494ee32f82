"""qgraph.registry: built-in passes, skipping, and plugins through the entry-point group."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import textwrap

import pytest

import qgraph
from qgraph.errors import PipelineError
from qgraph.options import CompileOptions
from qgraph.pipeline import Phase
from qgraph.registry import ENTRY_POINT_GROUP, registered_passes, target_problems
from qgraph.targets import TARGETS

CANONICALIZE = [
    "lift-constants",
    "shape-inference",
    "constant-folding",
    "identity-elimination",
    "common-subexpression-elimination",
    "dead-code-elimination",
]
FINALIZE = ["remove-unused", "topological-sort", "name-fix", "onnx-checker", "target-conformance"]


def test_builtin_pipeline_is_canonicalize_fusion_finalize():
    fusion = ["fusion", "runtime-fusion"]
    assert qgraph.build_pipeline("x86-vnni").names() == [*CANONICALIZE, *fusion, *FINALIZE]
    assert qgraph.build_pipeline("tensorrt").names() == [*CANONICALIZE, "fusion", *FINALIZE]


def test_skip_passes_and_unknown_names():
    options = CompileOptions(skip_passes=frozenset({"name-fix", "constant-folding"}))
    names = qgraph.build_pipeline("x86-avx2", options).names()
    assert "name-fix" not in names and "constant-folding" not in names
    with pytest.raises(PipelineError, match=r"unknown pass.*no-such-pass"):
        qgraph.build_pipeline("x86-avx2", CompileOptions(skip_passes=frozenset({"no-such-pass"})))


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install a fake distribution whose entry points name the given objects."""

    def install(entry_points: dict[str, str], module_source: str) -> None:
        (tmp_path / "qgraph_test_plugin.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / "qgraph_test_plugin-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: qgraph-test-plugin\nVersion: 1.0\n"
        )
        lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()

    yield install
    sys.modules.pop("qgraph_test_plugin", None)


PLUGIN_MODULE = """
    import onnx_ir as ir
    from qgraph import PassInfo, Phase

    class Mark(ir.passes.InPlacePass):
        def call(self, model):
            model.graph.metadata_props["plugin"] = "ran"
            return ir.passes.PassResult(model, modified=True)

    MARK = PassInfo("plugin-mark", Phase.FLOAT_REWRITES, "marks the graph", lambda ctx: Mark())
    ONLY_FOR_TENSORRT = [
        PassInfo("plugin-trt", Phase.LOWER, "tensorrt only",
                 lambda ctx: Mark() if ctx.target.activations.symmetric else None),
    ]
    CLASH = PassInfo("name-fix", Phase.FINALIZE, "clashes", lambda ctx: Mark())
    NOT_A_PASS_INFO = 42
"""


def test_plugin_passes_join_the_pipeline_at_their_phase(plugin, small_model):
    plugin(
        {"mark": "qgraph_test_plugin:MARK", "trt": "qgraph_test_plugin:ONLY_FOR_TENSORRT"},
        PLUGIN_MODULE,
    )
    infos = {info.name: info for info in registered_passes()}
    assert infos["plugin-mark"].origin == "qgraph-test-plugin"
    assert infos["plugin-mark"].phase is Phase.FLOAT_REWRITES
    names = qgraph.build_pipeline("x86-avx2").names()
    assert (
        names.index("dead-code-elimination")
        < names.index("plugin-mark")
        < names.index("remove-unused")
    )
    assert "plugin-trt" not in names
    assert "plugin-trt" in qgraph.build_pipeline("tensorrt").names()
    model = qgraph.build_pipeline("x86-avx2").run(qgraph.load(small_model)).model
    assert model.graph.metadata_props["plugin"] == "ran"


def test_broken_or_clashing_plugins_are_skipped_with_a_warning(plugin, caplog):
    plugin(
        {
            "clash": "qgraph_test_plugin:CLASH",
            "missing": "qgraph_test_plugin:DOES_NOT_EXIST",
            "wrong": "qgraph_test_plugin:NOT_A_PASS_INFO",
        },
        PLUGIN_MODULE,
    )
    with caplog.at_level(logging.WARNING):
        names = [info.name for info in registered_passes()]
    assert names.count("name-fix") == 1
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "clashes with an existing pass" in messages
    assert "cannot load qgraph pass plugin 'missing'" in messages
    assert "plugin 'wrong'" in messages


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_registered_target_asks_only_for_what_the_passes_do(name):
    assert target_problems(TARGETS[name]) == []


def test_a_target_record_asking_for_more_is_refused_by_name():
    """A record naming a rule or op no pass has would be silently ignored: refused instead."""
    avx2 = TARGETS["x86-avx2"]
    ops = avx2.kernels.quantizable_ops | {"LSTM"}
    records = {
        "lowering rule 'qlinear-lstm'": dataclasses.replace(
            avx2, name="custom", lowering_rules=("qlinear-conv", "qlinear-lstm")
        ),
        "quantizable op 'LSTM'": dataclasses.replace(
            avx2, name="custom", kernels=dataclasses.replace(avx2.kernels, quantizable_ops=ops)
        ),
    }
    for message, record in records.items():
        with pytest.raises(PipelineError, match=f"target 'custom': .*{message}"):
            qgraph.build_pipeline(record)
