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

from qgraph.budget import Budget
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
from qgraph.graph.traversal import KEEP_FLOAT_KEY, all_nodes, source_names
from qgraph.inspection import ModelSummary, summarize
from qgraph.kernels import is_qdq_group
from qgraph.options import CompileOptions
from qgraph.outputs import Inputs, check_output, dataset_inputs
from qgraph.passes.rotation import RotationReport
from qgraph.passes.rotation.online import KEEP_FLOAT_REASON as ONLINE_REASON
from qgraph.passes.smoothquant import SmoothQuantReport
from qgraph.passes.stored_weights import StoredWeightsReport
from qgraph.pipeline import PassRecord, Phase, Pipeline, PipelineResult
from qgraph.planning import (
    BudgetError,
    OpCost,
    PlanReport,
    PlanSample,
    budget_score,
    float_seconds,
    gain_share,
    kept_reasons,
    plan,
    plan_report,
    plan_sample,
    reference_outputs,
    sixteen_bit_costs,
    speed_gains,
    storable,
    table_costs,
)
from qgraph.recipe import AUTO_ALPHA, AUTO_ROTATION, KvCache
from qgraph.registry import build_pipeline
from qgraph.sections import counted
from qgraph.stopwatch import SAME_SPEED, alternating_medians, thread_words
from qgraph.targets import QuantFormat, TargetSpec, get_target, is_host_target
from qgraph.timing import CostModel, Timer, default_cache

logger = logging.getLogger(__name__)

CHECKER_PASS = "onnx-checker"
TARGET_METADATA_KEY = "qgraph.target"
WHOLE_MODEL_RUNS = 9
"""Alternating runs of the whole model in float and as compiled, after two untimed rounds: the
plan's last check, where its gains were timed on this host (``_whole_model_check``)."""
UNROTATED_FOR_FLOAT = "not rotated: with every op in float, the rotations would only cost time"
"""The plan's rotation verdict where the whole model ran slower rotated and in 8 bits: the
online rotations serve only 8-bit readers, so the float fallback is built unrotated."""

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
        names = pipeline.names()  # the plan's trials may run a pass it leaves out (rotation)
        done = f" {names.index(name) + 1}/{total}" if name in names else ""
        tell(f"pass{done}: {phase.value} / {name}")

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
    2. The float rewrites, once: with ``smoothquant = "auto"``, first without SmoothQuant
       (``_smoothing_trial``), kept if every candidate in 8 bits then meets the budget; else
       in place with it, leaving alone the activations whose readers 8 bits make slower
       (they stay float, and its ``X / s`` would only cost time).
    3. With ``rotate = "auto"``, where every candidate in 8 bits misses the budget, the same
       rewrites with rotation (``_rotation_trial``): if every candidate in 8 bits then meets
       it, and int8's gain exceeds what the rotation's float ops cost, that is the model.
    4. Else the plan's rounds, each a Q/DQ compile from a copy of the rewritten model; the
       chosen one compiled again in the asked format where that is not Q/DQ.
    5. Where the plan kept in float every reader of a tensor SmoothQuant scaled (magika's
       Conv), the float rewrites run again told so, and the chosen round is compiled from
       them: its float ops read their own weights, with no ``X / s`` before them.
    6. Where the gains were timed on this host, the chosen model and its float form are timed
       whole (``_whole_model_check``); where it runs slower, every op stays float (their
       weights stored in 8 bits where the budget holds), from float rewrites without the
       smoothing and the rotation that then serve no quantized reader.

    The probe and the rounds keep a decoder's KV cache float, as the plan's data holds it;
    an int8 cache (``--kv-cache int8``) is calibrated once, in the chosen round's final compile.
    """
    full_options = options
    asked_cache = options.quantization.kv_cache
    auto_rotation = options.quantization.rotate == AUTO_ROTATION
    options = dataclasses.replace(
        options,
        quantization=dataclasses.replace(
            options.quantization, kv_cache=KvCache.FLOAT, rotate=options.quantization.rotate is True
        ),
    )
    quantization = options.quantization
    float_options = dataclasses.replace(options, quantization=None)
    reference = build_pipeline(spec, float_options).run(_copy(model)).model
    sample = plan_sample(
        quantization.calib,
        quantization.plan_data,
        input_specs(model.graph),
        quantization.budget.rows_to_resolve(),
    )
    tell("plan: timing each op in float and in 8 bits")
    unsmoothed = dataclasses.replace(quantization, smoothquant=None)
    probe_options = dataclasses.replace(options, quantization=unsmoothed, format=QuantFormat.QDQ)
    probe = build_pipeline(spec, probe_options)  # Q/DQ, like the rounds: the same node names
    timer = None if quantization.measure and is_host_target(spec) else CostModel()
    if quantization.measure and timer is not None:
        logger.info("target %s is not this host's CPU: int8 gains estimated, not timed", spec.name)
    speeds = speed_gains(probe.run(_copy(model)).model, sample.batches[0], spec, timer)
    speeds += table_costs(reference, sample.batches[0], speeds, spec, timer or default_cache())
    slow = [op for op in speeds if op.always_float]
    slow_kept = tuple(kept_reasons(slow, quantization.budget).items())
    informed = dataclasses.replace(quantization, keep_float=slow_kept)
    smoothing = quantization.smoothquant is not None
    pristine = ir.to_proto(model) if smoothing or auto_rotation else None
    rewrite_options = dataclasses.replace(options, quantization=informed)
    options = _without_float_rewrites(options, spec)
    expected = reference_outputs(reference, sample.batches)
    context = _PlanContext(spec, sample, expected, speeds, timer, on_pass, tell)
    smoothing_trial = _Trial()
    if quantization.smoothquant == AUTO_ALPHA:
        smoothing_trial = _smoothing_trial(context, pristine, rewrite_options, options)
    if smoothing_trial.prepared is not None:
        prepared, rounds = smoothing_trial.prepared, smoothing_trial.rounds
    else:
        prepared = _float_rewrites(model, spec, rewrite_options, on_pass)
        rounds = _Rounds(spec, options, ir.to_proto(prepared.model), on_pass)
    trial = _Trial()
    if auto_rotation:
        trial = _rotation_trial(context, pristine, rewrite_options, rounds)
    rotated = trial.report is not None
    if rotated:
        rounds, records, report = trial.rounds, trial.prepared.records, trial.report
    else:
        report = _plan_with_float_tables_if_needed(context, reference, rounds, quantization.budget)
        report = dataclasses.replace(report, rotation=trial.verdict)
        records = prepared.records
    report = dataclasses.replace(report, smoothing=smoothing_trial.verdict)

    def without_wasted_rewrites(
        report: PlanReport, rotate: bool
    ) -> tuple[list[PassRecord], _Rounds] | None:
        """The float rewrites again, told what stays float, where SmoothQuant scaled a tensor
        all of whose readers the report keeps in float, or where the model was rotated and
        ``rotate`` is off (else None)."""
        kept = report.kept_reasons()
        wasted = smoothed_for_float_readers(records, lambda: rounds.qdq(kept))
        unrotate = rotated and not rotate
        if not wasted and not unrotate:
            return None
        if wasted:
            tell(f"plan: smoothing undone where every reader stays float ({', '.join(wasted)})")
        if unrotate:
            tell("plan: rotation undone, every op stays float")
        told = dataclasses.replace(informed, keep_float=tuple(kept.items()), rotate=rotate)
        prepared = _float_rewrites(
            ir.from_proto(pristine),
            spec,
            dataclasses.replace(full_options, quantization=told),
            on_pass,
        )
        return prepared.records, _Rounds(spec, options, ir.to_proto(prepared.model), on_pass)

    rebuilt = without_wasted_rewrites(report, rotated)
    if rebuilt:
        records, rounds = rebuilt
    report, wide = _sixteen_bit_trial(context, rounds, report, quantization.budget)
    report, stored = _storage_trial(context, rounds, report, quantization.budget, wide)
    other_format = (options.format or spec.format) is not QuantFormat.QDQ
    recompile = bool(rebuilt) or other_format or asked_cache is not KvCache.FLOAT

    def final(report: PlanReport, wide: tuple[str, ...], stored: tuple[str, ...]) -> PipelineResult:
        kept = report.kept_reasons()
        if recompile:
            return rounds.compile(kept, options.format, asked_cache, wide, stored)
        return rounds.qdq_result(kept, wide, stored)

    chosen = final(report, wide, stored)
    if context.timer is None and asked_cache is KvCache.FLOAT:
        report = _whole_model_check(context, reference, report, chosen, quantization.threads)
        if not report.whole_model_slower:
            return PipelineResult(chosen.model, records + chosen.records), report
        rebuilt = without_wasted_rewrites(report, rotate=False)
        if rebuilt:
            records, rounds = rebuilt
            recompile = True
        if rotated:
            report = dataclasses.replace(report, rotation=UNROTATED_FOR_FLOAT)
        report, stored = _all_float(context, rounds, report)
        chosen = final(report, (), stored)
    return PipelineResult(chosen.model, records + chosen.records), report


def _plan_with_float_tables_if_needed(
    context: _PlanContext, reference: ir.Model, rounds: _Rounds, budget: Budget
) -> PlanReport:
    """The plan's rounds; where the budget is out of reach even with every candidate float,
    again with the embedding tables in float too (``planning.table_costs(every=True)``)."""
    batches, speeds = context.sample.batches, context.speeds
    try:
        return plan(
            reference, rounds.qdq, context.sample, budget, speeds, context.tell, context.expected
        )[1]
    except BudgetError:
        timer = context.timer or default_cache()
        tables = table_costs(reference, batches[0], speeds, context.spec, timer, every=True)
        if not tables:
            raise
    context.tell("plan: out of reach with the tables in 8 bits; again with them in float")
    speeds = speeds + tables
    return plan(
        reference, rounds.qdq, context.sample, budget, speeds, context.tell, context.expected
    )[1]


class _Rounds:
    """The plan's compiles, each from a fresh copy of one float-rewritten model."""

    def __init__(
        self, spec: TargetSpec, options: CompileOptions, original: onnx.ModelProto, on_pass
    ) -> None:
        self.spec, self.options, self.original, self.on_pass = spec, options, original, on_pass
        self.done: dict[tuple[frozenset[str], ...], PipelineResult] = {}

    def compile(
        self,
        kept: dict[str, str],
        format: QuantFormat | None,
        cache: KvCache = KvCache.FLOAT,
        wide: tuple[str, ...] = (),
        stored: tuple[str, ...] = (),
    ) -> PipelineResult:
        """The model with ``kept`` in float, the activations ``wide`` in 16 bits and the
        weights of the float ops ``stored`` in 8 bits."""
        quantization = dataclasses.replace(
            self.options.quantization,
            keep_float=tuple(kept.items()),
            kv_cache=cache,
            sixteen_bit=wide,
            stored_weights=stored,
        )
        options = dataclasses.replace(self.options, quantization=quantization, format=format)
        pipeline = build_pipeline(self.spec, options)
        return pipeline.run(ir.from_proto(self.original), listener=self.on_pass)

    def qdq_result(
        self, kept: dict[str, str], wide: tuple[str, ...] = (), stored: tuple[str, ...] = ()
    ) -> PipelineResult:
        """The Q/DQ compile of ``compile``'s arguments, run once."""
        key = (frozenset(kept), frozenset(wide), frozenset(stored))
        if key not in self.done:
            self.done[key] = self.compile(kept, QuantFormat.QDQ, wide=wide, stored=stored)
        return self.done[key]

    def qdq(self, kept: dict[str, str], wide: tuple[str, ...] = ()) -> ir.Model:
        """The Q/DQ model with ``kept`` in float and ``wide`` in 16 bits, compiled once."""
        return self.qdq_result(kept, wide).model


@dataclasses.dataclass(frozen=True)
class _PlanContext:
    """What the plan's trials share: the target, the plan's data and the float model's
    outputs on it, each candidate's speed, and where to report."""

    spec: TargetSpec
    sample: PlanSample
    expected: list[dict]
    """The float model's outputs on the sample."""
    speeds: list[OpCost]
    timer: Timer | None
    on_pass: Callable[[Phase, str], None]
    tell: Progress

    @property
    def slow(self) -> tuple[OpCost, ...]:
        """The candidates 8 bits make slower here: float in every trial."""
        return tuple(op for op in self.speeds if op.always_float)


@dataclasses.dataclass
class _Trial:
    """A float rewrite the plan tried (leaving SmoothQuant out, rotating)."""

    verdict: str = ""
    """What the plan found, for its report (empty: not tried)."""
    prepared: PipelineResult | None = None
    """The trial's float rewrites and their rounds, if it won."""
    rounds: _Rounds | None = None
    report: PlanReport | None = None
    """The plan's report, where the trial settles the plan (every op in 8 bits)."""


def _smoothing_trial(
    context: _PlanContext,
    pristine: onnx.ModelProto,
    rewrite_options: CompileOptions,
    round_options: CompileOptions,
) -> _Trial:
    """Leave SmoothQuant out (``smoothquant = "auto"`` under the plan) where every op 8 bits do
    not slow down meets the budget without it: an ``X / s`` no producer absorbs is a ``Mul``
    that only costs time, and smoothing does not always help (the reference encoder's default
    compile, held out: 37.6 dB of output SQNR unsmoothed, 34.5 smoothed)."""
    budget, batches = rewrite_options.quantization.budget, context.sample.batches
    kept = kept_reasons(context.slow, budget)
    unsmoothed = dataclasses.replace(
        rewrite_options,
        quantization=dataclasses.replace(rewrite_options.quantization, smoothquant=None),
    )
    prepared = _float_rewrites(ir.from_proto(pristine), context.spec, unsmoothed, context.on_pass)
    rounds = _Rounds(context.spec, round_options, ir.to_proto(prepared.model), context.on_pass)
    figure = budget_score(budget, context.expected, rounds.qdq(kept), batches)
    if not budget.met(figure):
        return _Trial(f"smoothed: without it every op in 8 bits gave {budget.show(figure)}")
    verdict = f"not smoothed: without it every op in 8 bits gave {budget.show(figure)}"
    return _Trial(verdict, prepared, rounds)


def _rotation_trial(
    context: _PlanContext,
    pristine: onnx.ModelProto,
    rewrite_options: CompileOptions,
    unrotated: _Rounds,
) -> _Trial:
    """Rotate where 8 bits everywhere miss the budget unrotated and meet it rotated, and the
    rotation's float ops cost less than int8 saves (``rewrite_options``: the float rewrites',
    told which ops 8 bits make slower)."""
    start = time.perf_counter()
    budget, batches = rewrite_options.quantization.budget, context.sample.batches
    kept = kept_reasons(context.slow, budget)
    plain = budget_score(budget, context.expected, unrotated.qdq(kept), batches)
    if budget.met(plain):
        return _Trial("not rotated: every op in 8 bits meets the budget unrotated")
    context.tell("plan: trying the model rotated")
    rotated_options = dataclasses.replace(
        rewrite_options,
        quantization=dataclasses.replace(rewrite_options.quantization, rotate=True),
    )
    prepared = _float_rewrites(
        ir.from_proto(pristine), context.spec, rotated_options, context.on_pass
    )
    if not any(
        isinstance(r.details, RotationReport) and r.details.applied for r in prepared.records
    ):
        return _Trial("not rotated: no rotation applies to this model")
    online = [
        node
        for node in prepared.model.graph
        if node.metadata_props.get(KEEP_FLOAT_KEY) == ONLINE_REASON
    ]
    cost = float_seconds(prepared.model, batches[0], online, context.spec, context.timer)
    gain = sum(max(op.gain_seconds, 0.0) for op in context.speeds if not op.always_float)
    if cost >= gain:
        return _Trial(
            f"not rotated: its float ops would take {cost * 1e3:.1f} ms, more than the "
            f"{gain * 1e3:.1f} ms int8 saves here"
        )
    rounds = _Rounds(context.spec, unrotated.options, ir.to_proto(prepared.model), context.on_pass)
    figure = budget_score(budget, context.expected, rounds.qdq(kept), batches)
    if not budget.met(figure):
        return _Trial(
            f"not rotated: rotated, every op in 8 bits gave {budget.show(figure)}, short of it"
        )
    verdict = (
        f"rotated: every op in 8 bits gave {budget.show(plain)} unrotated, "
        f"{budget.show(figure)} rotated, whose float ops take {cost * 1e3:.1f} ms of the "
        f"{gain * 1e3:.1f} ms int8 saves"
    )
    figures = (figure, figure)  # the model is the rotated one; the verdict gives both figures
    report = plan_report(budget, context.sample, figures, context.slow, context.speeds, 2, start)
    return _Trial(verdict, prepared, rounds, dataclasses.replace(report, rotation=verdict))


def _sixteen_bit_trial(
    context: _PlanContext, rounds: _Rounds, report: PlanReport, budget: Budget
) -> tuple[PlanReport, tuple[str, ...]]:
    """Give the ops the plan kept in float for accuracy 16-bit activations (8-bit weights),
    where the target runs them as two 8-bit digits no slower than float here
    (``planning.sixteen_bit_costs``), if the budget still holds: their error is then nearly
    their weights' alone. Returns the report and the activations put in 16 bits."""
    costs = sixteen_bit_costs(report.kept_float, context.spec, context.timer)
    if not costs:
        return report, ()
    context.tell("plan: trying 16-bit activations for the ops kept in float")
    names = {op.node for op in costs}
    kept_ops = tuple(op for op in report.kept_float if op.node not in names)
    wide = tuple(dict.fromkeys(op.activation for op in costs))
    candidate = rounds.qdq(kept_reasons(kept_ops, budget), wide)
    figure = budget_score(budget, context.expected, candidate, context.sample.batches)
    if not budget.met(figure):
        ops = ", ".join(op.node for op in costs)
        verdict = f"16-bit activations for {ops} gave {budget.show(figure)}: kept in float"
        return dataclasses.replace(report, sixteen_bit=verdict), ()
    report = dataclasses.replace(
        report,
        kept_float=kept_ops,
        wide=tuple(costs),
        final=figure,
        gain_share=gain_share(kept_ops, context.speeds, tuple(costs)),
        rounds=report.rounds + 1,
    )
    return report, wide


def _storage_trial(
    context: _PlanContext,
    rounds: _Rounds,
    report: PlanReport,
    budget: Budget,
    wide: tuple[str, ...],
) -> tuple[PlanReport, tuple[str, ...]]:
    """Store in 8 bits the weights of the ops the plan keeps in float (``planning.storable``),
    where the budget still holds: first all of them, else those kept for speed only. They
    still compute in float, as fast as before (``passes/stored_weights.py``). Returns the
    report and the ops whose weights are stored."""
    candidates = storable(report.kept_float)
    tiers = (candidates, [op for op in candidates if op.slower])
    kept, tried = report.kept_reasons(), []
    for ops in dict.fromkeys(tuple(op.node for op in tier) for tier in tiers if tier):
        trying = counted(len(ops), "op")
        context.tell(f"plan: trying 8-bit stored weights for {trying} kept in float")
        result = rounds.qdq_result(kept, wide, ops)
        figure = budget_score(budget, context.expected, result.model, context.sample.batches)
        if budget.met(figure):
            stored = _stored_weights(result)
            verdict = (
                f"the weights of {counted(len(stored), 'op')} kept in float stored in 8 bits "
                f"(float compute, expanded at load) give {budget.show(figure)}"
                + "".join(f" ({attempt})" for attempt in tried)
            )
            rounds_run = report.rounds + len(tried) + 1
            report = dataclasses.replace(report, final=figure, rounds=rounds_run, storage=verdict)
            return report, ops
        tried.append(f"with {len(ops)}: {budget.show(figure)}")
    if not tried:
        return report, ()
    verdict = f"8-bit stored weights for the ops kept in float ({', '.join(tried)}): not stored"
    return dataclasses.replace(report, storage=verdict, rounds=report.rounds + len(tried)), ()


def _whole_model_check(
    context: _PlanContext,
    reference: ir.Model,
    report: PlanReport,
    chosen: PipelineResult,
    threads: int,
) -> PlanReport:
    """The runtime's verdict on the plan: the chosen model and the float one (the same float
    rewrites) timed whole on the plan's first batch at ``threads`` intra-op threads (the
    count the model will run at, ``QuantOptions.threads``), alternating. Each op's gain
    was timed alone, and alone a float op pays layout changes that onnxruntime removes from a
    chain of them (a 16-channel Conv: NCHWc reorders), while the quantized model pays Q/DQ
    where int8 and float ops meet; on a model of small ops the two can outweigh the ops'
    gains, and more threads split the float ops' work better than the quantized ones' small
    ops. Returns the report with the verdict; where the chosen model runs more than
    ``SAME_SPEED`` slower, with every op kept in float (``_all_float`` finishes it)."""
    if len(report.kept_float) == len(context.speeds) and not report.wide:
        return report
    context.tell("plan: timing the whole model in float and as compiled")
    feeds = context.sample.batches[0]
    models = [ir.to_proto(reference), ir.to_proto(chosen.model)]
    float_time, compiled_time = alternating_medians(models, feeds, WHOLE_MODEL_RUNS, threads)
    times = f"{compiled_time * 1e3:.2f} ms against {float_time * 1e3:.2f} ms in float"
    where = thread_words(threads)
    if compiled_time <= (1 + SAME_SPEED) * float_time:
        verdict = (
            f"the whole model ran {float_time / compiled_time:.2f}x its float form here "
            f"({times}, {where}, measured)"
        )
        return dataclasses.replace(report, whole_model=verdict)
    context.tell("plan: the whole model ran slower in 8 bits; every op kept in float")
    reason = (
        "kept in float by the accuracy plan: the whole model ran slower with its ops in 8 bits "
        f"here ({compiled_time * 1e3:.2f} ms against {float_time * 1e3:.2f}, {where}, measured)"
    )
    verdict = (
        f"every op kept in float: with them in 8 bits the whole model ran slower here ({times}, "
        f"{where}, measured)"
    )
    return dataclasses.replace(
        report,
        kept_float=tuple(dataclasses.replace(op, fixed=reason) for op in context.speeds),
        wide=(),
        gain_share=0.0,
        sixteen_bit="",
        storage="",
        whole_model=verdict,
        whole_model_slower=True,
    )


def _all_float(
    context: _PlanContext, rounds: _Rounds, report: PlanReport
) -> tuple[PlanReport, tuple[str, ...]]:
    """``report`` (every op kept in float) with the budget's figure measured, and its weights
    stored in 8 bits where the budget holds (``_storage_trial``)."""
    everything_float = rounds.qdq(report.kept_reasons())
    batches = context.sample.batches
    figure = budget_score(report.budget, context.expected, everything_float, batches)
    report = dataclasses.replace(report, final=figure)
    return _storage_trial(context, rounds, report, report.budget, ())


def _stored_weights(result: PipelineResult) -> tuple[str, ...]:
    """The ops whose weights the compile's store-float-weights pass stored in 8 bits."""
    reports = [r.details for r in result.records if isinstance(r.details, StoredWeightsReport)]
    return tuple(name for report in reports for name in report.stored)


def smoothed_for_float_readers(
    records: list[PassRecord], compiled: Callable[[], ir.Model]
) -> list[str]:
    """Tensors SmoothQuant scaled (``X / s``, ``diag(s) W``) none of whose readers is
    quantized in the model ``compiled`` gives (compiled only where something was scaled):
    the plan kept them all in float, so the scaling buys nothing and an inserted ``Mul``
    only costs time."""
    smoothed = [
        tensor
        for record in records
        if isinstance(record.details, SmoothQuantReport)
        for tensor in record.details.smoothed
    ]
    if not smoothed:
        return []
    quantized = {node.name for node in all_nodes(compiled().graph) if is_qdq_group(node)}
    return [tensor.name for tensor in smoothed if quantized.isdisjoint(tensor.readers)]


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
