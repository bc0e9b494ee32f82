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

from qgraph.data import input_specs
from qgraph.errors import ModelLoadError, one_line
from qgraph.generation import CACHE_LAYOUT_KEY, CacheLayout, writes_cache_in_place
from qgraph.graph.model_io import (
    SOURCE_PATH_KEY,
    VERSION_METADATA_KEY,
    ModelSource,
    SavedModel,
    load,
    model_inputs,
    save,
)
from qgraph.graph.patterns import full_match
from qgraph.graph.traversal import all_nodes, source_names
from qgraph.inspection import ModelSummary, summarize
from qgraph.kernels import is_qdq_group
from qgraph.options import CompileOptions
from qgraph.outputs import Inputs, check_output, dataset_inputs
from qgraph.passes.smoothquant import SmoothQuantReport
from qgraph.pipeline import PassRecord, Phase, Pipeline, PipelineResult
from qgraph.planning import PlanReport, kept_reasons, plan, plan_sample, speed_gains
from qgraph.recipe import KvCache
from qgraph.registry import build_pipeline
from qgraph.targets import QuantFormat, TargetSpec, get_target, is_host_target
from qgraph.timing import CostModel

logger = logging.getLogger(__name__)

CHECKER_PASS = "onnx-checker"
TARGET_METADATA_KEY = "qgraph.target"

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
    plan: PlanReport | None = None
    """What the accuracy plan measured and kept in float, where it ran."""


def compile_model(
    source: ModelSource,
    target: TargetSpec | str = "auto",
    *,
    output: str | os.PathLike | None = None,
    options: CompileOptions | None = None,
    pipeline: Pipeline | None = None,
    external_data: bool | None = None,
    progress: Progress | None = None,
    inputs: Inputs | None = None,
) -> CompileResult:
    """Compile ``source`` for ``target``; write it to ``output`` when given.

    An ``ir.Model`` source is rewritten in place. ``pipeline`` replaces the target's default
    one (build it with ``build_pipeline`` and add your passes). ``external_data`` as in
    ``qgraph.save``. ``output`` is checked before any pass runs: it may be none of the files
    the compile reads (the model, its external data, the calibration data, and ``inputs``,
    such as a recipe: see ``qgraph.outputs``).
    """
    start = time.perf_counter()
    tell = progress or (lambda step: None)
    options = options or CompileOptions()
    spec = get_target(target)
    custom_pipeline = pipeline is not None
    pipeline = pipeline or build_pipeline(spec, options)
    tell("loading the model")
    model = load(source)
    protected = _read_files(model, options, inputs)
    if output is not None:
        check_output(output, protected)
    if CHECKER_PASS in pipeline.names():
        tell("checking the input")
        _check_input(source, model)
    before = summarize(model)
    total = len(pipeline.names())

    def on_pass(phase: Phase, name: str) -> None:
        done = pipeline.names().index(name)
        tell(f"pass {done + 1}/{total}: {phase.value} / {name}")

    plan_report = None
    if _planned(options, custom_pipeline):
        result, plan_report = _planned_run(model, spec, options, on_pass, tell)
    else:
        result = pipeline.run(model, listener=on_pass)
    _warn_unmatched_exclusions(result.model, options)
    result.model.metadata_props[TARGET_METADATA_KEY] = spec.name
    result.model.metadata_props[VERSION_METADATA_KEY] = version("qgraph")
    _stamp_cache_layout(result.model)
    saved = None
    if output is not None:
        tell(f"writing {output}")
        saved = save(result.model, output, external_data=external_data, inputs=protected)
    return CompileResult(
        model=result.model,
        target=spec,
        records=result.records,
        before=before,
        after=summarize(result.model),
        seconds=time.perf_counter() - start,
        saved=saved,
        plan=plan_report,
    )


def _stamp_cache_layout(model: ir.Model) -> None:
    """Say in the model whether generation may update its KV cache in place (the stamp an
    input model had is re-checked, never carried over)."""
    if writes_cache_in_place(model.graph):
        model.metadata_props[CACHE_LAYOUT_KEY] = CacheLayout.IN_PLACE.value
    else:
        model.metadata_props.pop(CACHE_LAYOUT_KEY, None)


def _read_files(model: ir.Model, options: CompileOptions, inputs: Inputs | None) -> Inputs:
    """The files a compile reads (the output must be none of them), each with what it is."""
    calib = options.quantization.calib if options.quantization is not None else None
    return {
        **model_inputs(model),
        **dataset_inputs(calib, "the calibration data"),
        **(inputs or {}),
    }


def _warn_unmatched_exclusions(model: ir.Model, options: CompileOptions) -> None:
    """An ``exclude_node`` pattern that matches no node of the compiled model, by its name or
    by the input model's names it stands for (``traversal.source_names``), or an
    ``exclude_op`` the model has none of, excluded nothing: say so rather than ignore it."""
    quantization = options.quantization
    if quantization is None:
        return
    nodes = list(all_nodes(model.graph))
    names = {name for node in nodes for name in (node.name, *source_names(node))}
    for pattern in quantization.exclude_node:
        if not any(full_match(pattern, name or "") for name in names):
            logger.warning("--exclude-node '%s' matches no node: it excludes nothing", pattern)
    for op_type in sorted(quantization.exclude_op - {node.op_type for node in nodes}):
        logger.warning("--exclude-op '%s': the model has no such op; it excludes nothing", op_type)


def _planned(options: CompileOptions, custom_pipeline: bool) -> bool:
    """The accuracy plan runs for static quantization with a budget and real calibration
    data, on qgraph's own pipeline (which it rebuilds for each round)."""
    quantization = options.quantization
    return not custom_pipeline and quantization is not None and quantization.planned


def _planned_run(
    model: ir.Model,
    spec: TargetSpec,
    options: CompileOptions,
    on_pass: Callable[[Phase, str], None],
    tell: Progress,
) -> tuple[PipelineResult, PlanReport]:
    """Compile under the accuracy plan.

    1. The float compile (the plan's reference: the same canonicalization and fusion, so the
       same value names) and a probe, every candidate in 8 bits without SmoothQuant, whose
       quantized ops are timed in float and in 8 bits (``planning.speed_gains``) where this
       host is the target's CPU, else estimated (``timing.CostModel``).
    2. The float rewrites, once, in place: SmoothQuant leaves alone the activations whose
       readers 8 bits make slower (they stay float, and its ``X / s`` would only cost time).
    3. The plan's rounds, each a Q/DQ compile from a copy of the rewritten model; the chosen
       one compiled again in the asked format where that is not Q/DQ.
    4. Where the plan kept in float every reader of a tensor SmoothQuant scaled (magika's
       Conv), the float rewrites run again told so, and the chosen round is compiled from
       them: its float ops read their own weights, with no ``X / s`` before them.

    The probe and the rounds keep a decoder's KV cache float, as the plan's data holds it;
    an int8 cache (``--kv-cache int8``) is calibrated once, in the chosen round's final compile.
    """
    full_options = options
    asked_cache = options.quantization.kv_cache
    options = dataclasses.replace(
        options, quantization=dataclasses.replace(options.quantization, kv_cache=KvCache.FLOAT)
    )
    quantization = options.quantization
    float_options = dataclasses.replace(options, quantization=None)
    reference = build_pipeline(spec, float_options).run(_copy(model)).model
    sample = plan_sample(quantization.calib, quantization.plan_data, input_specs(model.graph))
    tell("plan: timing each op in float and in 8 bits")
    unsmoothed = dataclasses.replace(quantization, smoothquant=None)
    probe = build_pipeline(spec, dataclasses.replace(options, quantization=unsmoothed))
    timer = None if quantization.measure and is_host_target(spec) else CostModel()
    if quantization.measure and timer is not None:
        logger.info("target %s is not this host's CPU: int8 gains estimated, not timed", spec.name)
    speeds = speed_gains(probe.run(_copy(model)).model, sample.batches[0], spec, timer)
    slow = [op for op in speeds if op.slower]
    slow_kept = tuple(kept_reasons(slow, quantization.budget).items())
    informed = dataclasses.replace(quantization, keep_float=slow_kept)
    pristine = ir.to_proto(model) if quantization.smoothquant is not None else None
    prepared = _float_rewrites(
        model, spec, dataclasses.replace(options, quantization=informed), on_pass
    )
    options = _without_float_rewrites(options, spec)
    original = ir.to_proto(prepared.model)
    quantization = options.quantization
    rounds: dict[frozenset[str], PipelineResult] = {}

    def compile_with(
        kept: dict[str, str], format: QuantFormat | None, cache: KvCache = KvCache.FLOAT
    ) -> PipelineResult:
        round_quantization = dataclasses.replace(
            quantization, keep_float=tuple(kept.items()), kv_cache=cache
        )
        round_options = dataclasses.replace(options, quantization=round_quantization, format=format)
        pipeline = build_pipeline(spec, round_options)
        return pipeline.run(ir.from_proto(original), listener=on_pass)

    def qdq_round(kept: dict[str, str]) -> ir.Model:
        rounds[frozenset(kept)] = compile_with(kept, QuantFormat.QDQ)
        return rounds[frozenset(kept)].model

    _, report = plan(reference, qdq_round, sample, quantization.budget, speeds, tell)
    kept = report.kept_reasons()
    chosen = rounds[frozenset(kept)]
    wasted = smoothed_for_float_readers(prepared.records, chosen.model)
    if wasted:
        tell(f"plan: smoothing undone where every reader stays float ({', '.join(wasted)})")
        final = dataclasses.replace(informed, keep_float=tuple(kept.items()))
        prepared = _float_rewrites(
            ir.from_proto(pristine),
            spec,
            dataclasses.replace(full_options, quantization=final),
            on_pass,
        )
        original = ir.to_proto(prepared.model)
    other_format = (options.format or spec.format) is not QuantFormat.QDQ
    if wasted or other_format or asked_cache is not KvCache.FLOAT:
        chosen = compile_with(kept, options.format, asked_cache)
    return PipelineResult(chosen.model, prepared.records + chosen.records), report


def smoothed_for_float_readers(records: list[PassRecord], compiled: ir.Model) -> list[str]:
    """Tensors SmoothQuant scaled (``X / s``, ``diag(s) W``) none of whose readers is
    quantized in ``compiled``: the plan kept them all in float, so the scaling buys nothing
    and an inserted ``Mul`` only costs time."""
    quantized = {node.name for node in all_nodes(compiled.graph) if is_qdq_group(node)}
    return [
        tensor.name
        for record in records
        if isinstance(record.details, SmoothQuantReport)
        for tensor in record.details.smoothed
        if quantized.isdisjoint(tensor.readers)
    ]


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


PREPARED_PHASES = frozenset({Phase.CANONICALIZE, Phase.FLOAT_REWRITES})


def _float_rewrites(
    model: ir.Model, spec: TargetSpec, options: CompileOptions, on_pass: Callable
) -> PipelineResult:
    """Run the float-equivalent phases once (SmoothQuant's search and the rotations need not
    run again in each round of the plan): the rewritten model (not always ``model`` itself:
    a pass may return a new one) and their records."""
    pipeline = build_pipeline(spec, options)
    for phase, name, _ in list(pipeline.passes()):
        if phase not in PREPARED_PHASES:
            pipeline.remove(name)
    return pipeline.run(model, listener=on_pass)


def _without_float_rewrites(options: CompileOptions, spec: TargetSpec) -> CompileOptions:
    """``options`` for the plan's rounds, from a model the float rewrites already made: they
    skip that phase (fusion again would fold SmoothQuant's ``X / s`` back into the weights)."""
    done = {
        name
        for phase, name, _ in build_pipeline(spec, options).passes()
        if phase is Phase.FLOAT_REWRITES
    }
    quantization = dataclasses.replace(options.quantization, smoothquant=None, rotate=False)
    return dataclasses.replace(
        options, quantization=quantization, skip_passes=options.skip_passes | done
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
        raise ModelLoadError(
            f"{label}: fails the ONNX checker ({one_line(str(error))}); "
            f"to compile it anyway, skip the '{CHECKER_PASS}' pass"
        ) from error
