"""``compile_model``: load, check, run the target's pipeline, save. What ``qgraph compile`` does."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from importlib.metadata import version

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from qgraph.errors import ModelLoadError
from qgraph.inspection import ModelSummary, summarize
from qgraph.model_io import SOURCE_PATH_KEY, ModelSource, SavedModel, load, save
from qgraph.options import CompileOptions
from qgraph.pipeline import PassRecord, Phase, Pipeline
from qgraph.registry import build_pipeline
from qgraph.targets import TargetSpec, get_target

logger = logging.getLogger(__name__)

CHECKER_PASS = "onnx-checker"
TARGET_METADATA_KEY = "qgraph.target"
VERSION_METADATA_KEY = "qgraph.version"

Progress = Callable[[str], None]
"""Told, in words, what the compile is doing now: loading, each pass, saving."""


@dataclasses.dataclass
class CompileResult:
    """The compiled model, what each pass did, and the model before and after."""

    model: ir.Model
    target: TargetSpec
    records: list[PassRecord]
    before: ModelSummary
    after: ModelSummary
    seconds: float
    saved: SavedModel | None


def compile_model(
    source: ModelSource,
    target: TargetSpec | str = "auto",
    *,
    output: str | os.PathLike | None = None,
    options: CompileOptions | None = None,
    pipeline: Pipeline | None = None,
    external_data: bool | None = None,
    progress: Progress | None = None,
) -> CompileResult:
    """Compile ``source`` for ``target``; write it to ``output`` when given.

    An ``ir.Model`` source is rewritten in place. ``pipeline`` replaces the target's default
    one (build it with ``build_pipeline`` and add your passes). ``external_data`` as in
    ``qgraph.save``.
    """
    start = time.perf_counter()
    tell = progress or (lambda step: None)
    options = options or CompileOptions()
    spec = get_target(target)
    pipeline = pipeline or build_pipeline(spec, options)
    tell("loading the model")
    model = load(source)
    if CHECKER_PASS in pipeline.names():
        tell("checking the input")
        _check_input(source, model)
    before = summarize(model)
    total = len(pipeline.names())

    def on_pass(phase: Phase, name: str) -> None:
        done = pipeline.names().index(name)
        tell(f"pass {done + 1}/{total}: {phase.value} / {name}")

    result = pipeline.run(model, listener=on_pass)
    result.model.metadata_props[TARGET_METADATA_KEY] = spec.name
    result.model.metadata_props[VERSION_METADATA_KEY] = version("qgraph")
    saved = None
    if output is not None:
        tell(f"writing {output}")
        saved = save(result.model, output, external_data=external_data)
    return CompileResult(
        model=result.model,
        target=spec,
        records=result.records,
        before=before,
        after=summarize(result.model),
        seconds=time.perf_counter() - start,
        saved=saved,
    )


def _check_input(source: ModelSource, model: ir.Model) -> None:
    """Refuse an input the ONNX checker rejects, so the fault is not blamed on a pass.

    Files, bytes and protos are checked as given (onnx's C++ reads them directly); only an
    ``ir.Model`` source has to be serialized for the checker.
    """
    try:
        if isinstance(source, ir.Model):
            common.CheckerPass()(model)
        elif isinstance(source, (bytes, onnx.ModelProto)):
            onnx.checker.check_model(source)
        else:
            onnx.checker.check_model(os.fspath(source))
    except onnx.checker.ValidationError as error:
        label = model.meta.get(SOURCE_PATH_KEY, "the input model")
        first_line = str(error).strip().splitlines()[0]
        raise ModelLoadError(
            f"{label}: fails the ONNX checker ({first_line}); "
            f"to compile it anyway, skip the '{CHECKER_PASS}' pass"
        ) from error
