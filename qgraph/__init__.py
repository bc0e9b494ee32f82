"""qgraph: an ONNX graph-rewriting quantization compiler.

The names below load their modules on first use (PEP 562), so that ``import qgraph`` (and the
command line's entry point, ``qgraph.entry``) costs nothing until one is used.

Load a model, build a target's pipeline of onnx_ir passes, run it, save::

    import qgraph

    result = qgraph.compile_model("model.onnx", "x86-avx2", output="model.x86-avx2.onnx")
    for record in result.records:
        print(record.phase.value, record.name, record.seconds, record.modified)

Add a pass of your own at a named phase::

    pipeline = qgraph.build_pipeline("x86-avx2").add(MyPass(), "float-rewrites")
    qgraph.compile_model("model.onnx", "x86-avx2", pipeline=pipeline, output="out.onnx")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qgraph.analysis.graph_view import to_networkx
    from qgraph.compiler import CompileResult, compile_model
    from qgraph.errors import QGraphError
    from qgraph.graph.model_io import load, save
    from qgraph.inspection import ModelSummary, summarize
    from qgraph.options import CompileOptions
    from qgraph.pipeline import PassRecord, Phase, Pipeline, PipelineResult
    from qgraph.recipe import Mode, QuantOptions, load_recipe, quant_options
    from qgraph.registry import PassContext, PassInfo, build_pipeline, registered_passes
    from qgraph.targets import TargetSpec, get_target

__version__ = "0.1.0"

__all__ = [
    "CompileOptions",
    "CompileResult",
    "Mode",
    "ModelSummary",
    "PassContext",
    "PassInfo",
    "PassRecord",
    "Phase",
    "Pipeline",
    "PipelineResult",
    "QGraphError",
    "QuantOptions",
    "TargetSpec",
    "build_pipeline",
    "compile_model",
    "get_target",
    "load",
    "load_recipe",
    "quant_options",
    "registered_passes",
    "save",
    "summarize",
    "to_networkx",
]

_HOMES = {
    "CompileOptions": "qgraph.options",
    "CompileResult": "qgraph.compiler",
    "Mode": "qgraph.recipe",
    "ModelSummary": "qgraph.inspection",
    "PassContext": "qgraph.registry",
    "PassInfo": "qgraph.registry",
    "PassRecord": "qgraph.pipeline",
    "Phase": "qgraph.pipeline",
    "Pipeline": "qgraph.pipeline",
    "PipelineResult": "qgraph.pipeline",
    "QGraphError": "qgraph.errors",
    "QuantOptions": "qgraph.recipe",
    "TargetSpec": "qgraph.targets",
    "build_pipeline": "qgraph.registry",
    "compile_model": "qgraph.compiler",
    "get_target": "qgraph.targets",
    "load": "qgraph.graph.model_io",
    "load_recipe": "qgraph.recipe",
    "quant_options": "qgraph.recipe",
    "registered_passes": "qgraph.registry",
    "save": "qgraph.graph.model_io",
    "summarize": "qgraph.inspection",
    "to_networkx": "qgraph.analysis.graph_view",
}
"""Each public name -> the module that defines it."""


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'qgraph' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
