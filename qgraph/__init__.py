"""qgraph: an ONNX graph-rewriting quantization compiler.

Load a model, build a target's pipeline of onnx_ir passes, run it, save::

    import qgraph

    result = qgraph.compile_model("model.onnx", "x86-avx2", output="model.x86-avx2.onnx")
    for record in result.records:
        print(record.phase.value, record.name, record.seconds, record.modified)

Add a pass of your own at a named phase::

    pipeline = qgraph.build_pipeline("x86-avx2").add(MyPass(), "float-rewrites")
    qgraph.compile_model("model.onnx", "x86-avx2", pipeline=pipeline, output="out.onnx")
"""

from qgraph.compiler import CompileResult, compile_model
from qgraph.errors import QGraphError
from qgraph.graph_view import to_networkx
from qgraph.inspection import ModelSummary, summarize
from qgraph.model_io import load, save
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
