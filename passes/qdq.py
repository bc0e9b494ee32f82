"""Insert Q/DQ: turn the annotate pass's specs into QuantizeLinear / DequantizeLinear nodes.

For every annotated op (see ``passes/annotate.py``):

- its weight ``W`` is quantized offline, ``W_q = clamp(round(W / s_w) + z_w)``, stored as an
  integer initializer, and read through ``DequantizeLinear(W_q, s_w, z_w[, axis, block_size])``;
  with ``weight_rounding = "gptq"``, MatMul and Gemm weights are rounded by GPTQ instead
  (``passes/gptq.py``), from ``X^T X`` of their input collected in the same calibration run;
- its activation ``x`` gets ``DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x)``. In
  static mode ``[lo, hi]`` comes from calibration statistics (``qgraph.calibration``) and sets
  ``s_x, z_x`` once; in dynamic mode ``DynamicQuantizeLinear`` computes them per run from the
  tensor's own min/max (uint8, asymmetric);
- its bias ``b`` becomes int32 with scale ``s_x * s_w`` and zero point 0 (static mode).

An activation read by several annotated ops is quantized once (one pair shared by all), unless
the target wants one pair per consumer (``qdq_per_consumer``). Readers that are not annotated
keep reading the float tensor. An activation whose calibrated range is not finite stays in
float, and so does the op that reads it. So does one too noisy for 8 bits: where the expected
SQNR ``10 log10(E[x^2] / (s_x^2 / 12))`` (uniform rounding noise, from the calibration
histogram) is under ``min_sqnr_db``, it goes to 16 bits on a target with 16-bit kernels
(``int16_kernels``), and its readers stay in float on any other. The skip input of an
annotated residual ``Add`` is quantized the same way (static mode), sharing the pair of an op
that reads it too.

Degenerate calibration never yields a silent zero model. Scales have a floor
(``quant_spec.SCALE_FLOOR``, so ``s_x * s_w`` is a normal float32), and a range under it is a
warning. An op whose int32 bias would saturate, ``max |b| / (s_x * s_w) > 2^31 - 1``, stays in
float with a warning naming it: clipping the bias would move the op's output by up to ``|b|``,
and raising ``s_x`` to fit it would coarsen every other value of the input. An activation whose
range a few values dominate (``calibration.dominated``: ``max|x|`` over 1000 times the edge of
the bulk of its nonzero values, and a scale that puts most of them at 0, e.g. one 1e30 among
normal batches, with any method) keeps its readers in float, with a warning naming the tensor
and the batch that held the peak.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from qgraph.calibration import (
    DOMINANCE_RATIO,
    Accumulators,
    TensorStatistics,
    collect,
    dominated,
    estimated_sqnr_db,
    random_batches,
    tensor_range,
)
from qgraph.data import DataSource, batch_files
from qgraph.errors import QGraphError
from qgraph.ops import MICROSOFT_DOMAIN
from qgraph.options import CalibrationProgress
from qgraph.passes.annotate import (
    WEIGHT_LAYOUTS,
    AnnotationKind,
    EmbeddingAnnotation,
    NodeAnnotation,
    ResidualAnnotation,
    annotation_problems,
    take_annotation,
    transposed_table,
)
from qgraph.passes.gptq import InputGram, gptq_quantize
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant_spec import (
    INT32_LIMIT,
    SCALE_FLOOR,
    QuantizedTensor,
    QuantSpec,
    bias_levels,
    natural_scale,
    quantize_bias,
    quantize_weight,
    scale_and_zero_point,
)
from qgraph.recipe import Mode, QuantOptions, WeightRounding
from qgraph.sections import QuantizationOutcome
from qgraph.targets import TargetSpec
from qgraph.traversal import KEEP_FLOAT_KEY

logger = logging.getLogger(__name__)


FLOAT_SOURCE_KEY = "qgraph.float_source"
"""In-memory ``node.meta`` of a constant's DequantizeLinear: the float initializer it replaced,
so a later pass can put it back (``passes/runtime_check.py``)."""


class CalibrationMissingError(QGraphError):
    """Static quantization was asked for without calibration data."""


@dataclasses.dataclass
class QDQReport:
    """What the insert-qdq pass did."""

    quantized: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    float_reasons: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Node name -> (op type, reason) for annotated ops that stayed in float."""
    activation_pairs: int = 0
    residual_inputs: int = 0
    weights: int = 0
    biases: int = 0
    calibration_batches: int = 0
    promoted: dict[str, float] = dataclasses.field(default_factory=dict)
    """Activations quantized to 16 bits, with the SQNR (dB) 8 bits would have had."""
    kept_float: dict[str, float] = dataclasses.field(default_factory=dict)
    """Activations whose readers stayed in float instead, with that SQNR (dB)."""
    gptq_weights: int = 0
    """Weights rounded by GPTQ (the others: to nearest)."""
    embeddings: int = 0
    """Gathers reading an integer embedding table."""

    def outcome(self) -> QuantizationOutcome:
        """The ops quantized, and the annotated ones that stayed in float."""
        return QuantizationOutcome(
            quantized=self.quantized.copy(), left_in_float=dict(self.float_reasons)
        )

    def summary(self) -> str:
        """What was quantized, how many Q/DQ pairs, on how much calibration data."""
        line = (
            f"{self.weights} weights and {self.biases} biases quantized, "
            f"{self.activation_pairs} activation Q/DQ pairs"
        )
        if self.residual_inputs:
            line += f" ({self.residual_inputs} residual Adds read one on their skip input)"
        if self.gptq_weights:
            line += f" ({self.gptq_weights} weights rounded by GPTQ)"
        if self.calibration_batches:
            line += f", calibrated on {self.calibration_batches} batches"
        if self.promoted:
            worst = min(self.promoted.values())
            line += (
                f"; {len(self.promoted)} activations in 16 bits, where 8 would have given an "
                f"SQNR as low as {worst:.1f} dB"
            )
        return line


@dataclasses.dataclass(frozen=True)
class ActivationQuantization:
    """The scale and zero point of one statically quantized activation."""

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray


class InsertQDQPass(ir.passes.InPlacePass):
    """Quantize the weights, activations and biases the annotate pass chose."""

    def __init__(
        self,
        target: TargetSpec,
        options: QuantOptions,
        progress: CalibrationProgress | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.options = options
        self.progress = progress

    def call(self, model: ir.Model) -> ReportingPassResult:
        common.NameFixPass()(model)
        graph = model.graph
        annotated = _taken(graph, NodeAnnotation)
        residuals = _taken(graph, ResidualAnnotation)
        embeddings = _taken(graph, EmbeddingAnnotation)
        report = QDQReport()
        specs = _activation_specs(annotated, residuals)
        rounded_by_gptq = self._gptq_inputs(annotated)
        statistics, grams = self._calibrate(model, specs, rounded_by_gptq, report)
        ranges = self._activation_ranges(specs, statistics, report)
        builder = _QDQBuilder(
            model, self.target.qdq_per_consumer, _weight_grams(annotated, rounded_by_gptq, grams)
        )
        static = self.options.mode is Mode.STATIC
        for node, annotation in annotated.items():
            reason = self._quantize(node, annotation, ranges, builder)
            if reason is None:
                report.quantized[node.op_type] += 1
            else:
                report.float_reasons[node.name] = (node.op_type, reason)
        for node, annotation in annotated.items():
            if static and annotation.output_spec and node.name not in report.float_reasons:
                builder.output_activation(node, ranges[node.outputs[0].name])
        for node, embedding in embeddings.items():
            reason = builder.embedding(node, embedding.spec)
            if reason is None:
                report.embeddings += 1
            else:
                report.float_reasons[node.name] = (node.op_type, reason)
        for node, residual in residuals.items():
            skip = residual.skip
            found = ranges.get(node.inputs[skip].name)
            if isinstance(found, ActivationQuantization):
                builder.static_activation(node, skip, found)
                report.residual_inputs += 1
            elif found is not None:
                node.metadata_props[KEEP_FLOAT_KEY] = f"its skip input stays float: {found}"
        report.biases = builder.biases
        report.activation_pairs = builder.activation_pairs
        report.weights = len(builder.weights)
        report.gptq_weights = builder.gptq_weights
        modified = bool(annotated or residuals or embeddings)
        return ReportingPassResult(model, modified=modified, details=report)

    def requires(self, model: ir.Model) -> None:
        """What the annotate pass handed over is annotations, and nothing else."""
        problems = annotation_problems(model)
        if problems:
            raise ir.passes.PreconditionError("; ".join(problems))

    def _quantize(
        self,
        node: ir.Node,
        annotation: NodeAnnotation,
        ranges: dict[str, ActivationQuantization | str],
        builder: _QDQBuilder,
    ) -> str | None:
        """Quantize one annotated node; the reason it stays in float, if it does."""
        index = annotation.activation
        found = None
        if annotation.output_spec is not None and self.options.mode is Mode.STATIC:
            output = ranges[node.outputs[0].name]
            if isinstance(output, str):
                return f"{output}, and the runtime fuses {node.op_type} only behind a Q"
        if index is not None and self.options.mode is Mode.STATIC:
            found = ranges[node.inputs[index].name]
            if isinstance(found, str):
                return found
            if annotation.bias is not None and not annotation.computed_weight:
                saturated = self._bias_saturates(node, annotation, found, builder)
                if saturated is not None:
                    return saturated
            builder.static_activation(node, index, found)
        elif index is not None:
            builder.dynamic_activation(node, index)
        if annotation.computed_weight:
            second = ranges[node.inputs[annotation.weight].name]
            if isinstance(second, str):
                return second
            builder.static_activation(node, annotation.weight, second)
            return None
        weight_scale = builder.weight(node, annotation.weight, annotation.weight_spec)
        if annotation.bias is not None and found is not None:
            builder.bias(node, annotation.bias, found.scale, weight_scale)
        return None

    def _gptq_inputs(self, annotated: Iterable[ir.Node]) -> dict[str, str]:
        """Node name -> the input whose ``X^T X`` GPTQ reads, for the annotated ops whose
        weights it rounds (none unless asked for)."""
        if self.options.weight_rounding is not WeightRounding.GPTQ:
            return {}
        inputs = {node.name: _gptq_input(node) for node in annotated}
        return {name: source for name, source in inputs.items() if source is not None}

    def _calibrate(
        self,
        model: ir.Model,
        specs: dict[str, QuantSpec],
        rounded_by_gptq: dict[str, str],
        report: QDQReport,
    ) -> tuple[dict[str, TensorStatistics], dict[str, InputGram]]:
        """One run over the calibration data: the statistics of every statically quantized
        activation, and ``X^T X`` of every input GPTQ reads."""
        static = self.options.mode is Mode.STATIC
        if not rounded_by_gptq and not (static and specs):
            return {}, {}
        wanted = specs if static else {}
        statistics = {name: TensorStatistics(histogram=True) for name in wanted}  # see dominated
        grams = {name: InputGram() for name in rounded_by_gptq.values()}
        accumulators = {
            name: Accumulators(
                part for part in (statistics.get(name), grams.get(name)) if part is not None
            )
            for name in {*statistics, *grams}
        }
        purpose, remedy = (
            ("static quantization", "choose --mode dynamic or weight-only")
            if statistics
            else ("GPTQ weight rounding", "choose --weight-rounding nearest")
        )
        collect(
            model,
            accumulators,
            calibration_data(self.options, model, purpose, remedy),
            progress=counting_batches(report, self.progress),
        )
        return statistics, grams

    def _activation_ranges(
        self,
        specs: dict[str, QuantSpec],
        statistics: dict[str, TensorStatistics],
        report: QDQReport,
    ) -> dict[str, ActivationQuantization | str]:
        """Calibrated scale and zero point of every statically quantized activation, or the
        reason its readers stay in float."""
        if not statistics:
            return {}
        promote = self.options.min_sqnr_db
        ranges: dict[str, ActivationQuantization | str] = {}
        for name, spec in specs.items():
            stats = statistics[name]
            if not stats.finite:
                logger.warning("'%s' held NaN or inf during calibration; left in float", name)
                ranges[name] = f"the range of '{name}' is not finite"
                continue
            lo, hi = tensor_range(stats, spec.method, percentile=self.options.percentile)
            if dominated(stats, float(natural_scale(lo, hi, spec))):
                ranges[name] = self._dominated(name, stats)
                continue
            if 0 < natural_scale(lo, hi, spec) < SCALE_FLOOR:
                logger.warning(
                    "'%s' spans only [%.3g, %.3g] in calibration: its scale is raised to the "
                    "floor %.3g, and values this small quantize to 0",
                    name,
                    lo,
                    hi,
                    SCALE_FLOOR,
                )
            scale, zero_point = scale_and_zero_point(lo, hi, spec)
            if self._user_dtype(name) is None and promote > 0:
                sqnr = estimated_sqnr_db(stats, lo, hi, float(scale))
                if sqnr < promote and not self.target.int16_kernels:
                    report.kept_float[name] = sqnr
                    ranges[name] = (
                        f"8 bits would give '{name}' an SQNR of {sqnr:.1f} dB, under "
                        f"{promote:g} dB, and the target has no 16-bit kernels"
                    )
                    continue
                if sqnr < promote:
                    spec = dataclasses.replace(spec, dtype=self._wide_dtype())
                    scale, zero_point = scale_and_zero_point(lo, hi, spec)
                    report.promoted[name] = sqnr
            ranges[name] = ActivationQuantization(spec, scale, zero_point)
        return ranges

    def _dominated(self, name: str, stats: TensorStatistics) -> str:
        """Warn that a few values dominate ``name``'s range; the reason its readers stay float."""
        batch = f"batch {stats.peak_batch}"
        calib = self.options.calib
        if isinstance(calib, (str, os.PathLike)):
            batch += f" ({batch_files(calib)[stats.peak_batch - 1].name})"
        reason = (
            f"the calibration range of '{name}' is dominated by a few values (max |x| "
            f"{stats.absmax:.3g} in {batch}, over {DOMINANCE_RATIO:g}x the bulk of its values)"
        )
        logger.warning("%s; its readers stay in float (check that batch)", reason)
        return reason

    def _bias_saturates(
        self,
        node: ir.Node,
        annotation: NodeAnnotation,
        found: ActivationQuantization,
        builder: _QDQBuilder,
    ) -> str | None:
        """The reason ``node`` stays float if its int32 bias would saturate, else None."""
        weight = node.inputs[annotation.weight]
        if transposed_table(weight) is not None:
            return None
        quantized = builder.quantized_weight(node, weight, annotation.weight_spec)
        bias = node.inputs[annotation.bias].const_value.numpy().reshape(-1)
        levels = bias_levels(bias, float(found.scale), quantized.scale)
        if levels <= INT32_LIMIT:
            return None
        reason = (
            f"its int32 bias would saturate (|b| / (s_x s_w) reaches {levels:.3g}, "
            f"int32 holds {INT32_LIMIT})"
        )
        logger.warning("'%s' (%s): %s; left in float", node.name, node.op_type, reason)
        return reason

    def _user_dtype(self, name: str) -> ir.DataType | None:
        return self.options.override(name).dtype

    def _wide_dtype(self) -> ir.DataType:
        """The 16-bit type of the target's activation signedness."""
        signed = self.target.activation_dtype.is_signed()
        return ir.DataType.INT16 if signed else ir.DataType.UINT16


def calibration_data(
    options: QuantOptions, model: ir.Model, purpose: str, remedy: str
) -> DataSource:
    """The calibration data ``options`` name; without any, an error saying that ``purpose``
    needs it and, besides giving some, the ``remedy``."""
    if options.calib is not None:
        return options.calib
    if options.calib_random is not None:
        return random_batches(model, options.calib_random)
    raise CalibrationMissingError(
        f"{purpose} needs calibration data: pass --calib DATA (a .npz file or a folder of "
        f"them), or --calib-random N, or {remedy}"
    )


def counting_batches(report, progress: CalibrationProgress | None) -> CalibrationProgress:
    """A progress callback that keeps the batch count in ``report.calibration_batches`` and
    tells ``progress``, if any."""

    def seen(done: int, total: int | None) -> None:
        report.calibration_batches = done
        if progress is not None:
            progress(done, total)

    return seen


def _taken(graph: ir.Graph, kind: type[AnnotationKind]) -> dict[ir.Node, AnnotationKind]:
    """The ``kind`` annotations of ``graph``'s nodes, in graph order, taken off the nodes."""
    taken = {node: take_annotation(node, kind) for node in graph}
    return {node: found for node, found in taken.items() if found is not None}


def _activation_specs(
    annotated: dict[ir.Node, NodeAnnotation], residuals: dict[ir.Node, ResidualAnnotation]
) -> dict[str, QuantSpec]:
    """The spec of every activation the annotated ops and residual Adds quantize, by name."""
    specs: dict[str, QuantSpec] = {}
    for node, annotation in annotated.items():
        if annotation.activation is not None:
            name = node.inputs[annotation.activation].name
            specs[name] = _wider(specs.get(name), annotation.activation_spec)
        if annotation.computed_weight:
            name = node.inputs[annotation.weight].name
            specs[name] = _wider(specs.get(name), annotation.weight_spec)
        if annotation.output_spec is not None:
            name = node.outputs[0].name
            specs[name] = _wider(specs.get(name), annotation.output_spec)
    for node, residual in residuals.items():
        name = node.inputs[residual.skip].name
        specs[name] = _wider(specs.get(name), residual.spec)
    return specs


def _is_quantize(node: ir.Node) -> bool:
    return node.op_type == "QuantizeLinear"


def _feeds_quantize_alone(value: ir.Value, through_relu: bool = True) -> bool:
    """``value``'s only reader is a Q, or (``through_relu``) a Relu whose only reader is a Q;
    neither value a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return False
    reader = uses[0].node
    if through_relu and reader.op_type == "Relu":
        return _feeds_quantize_alone(reader.outputs[0], through_relu=False)
    return _is_quantize(reader)


def _gptq_input(node: ir.Node) -> str | None:
    """The name of the input whose rows multiply the weight of a MatMul or a Gemm (not
    ``transA``), which GPTQ can round; None for other ops, whose weights go to nearest."""
    transposed = node.attributes.get("transA")
    if node.op_type not in ("MatMul", "Gemm") or (transposed and transposed.as_int()):
        return None
    return node.inputs[WEIGHT_LAYOUTS[node.op_type].activation].name


def _weight_grams(
    annotated: dict[ir.Node, NodeAnnotation],
    rounded_by_gptq: dict[str, str],
    grams: dict[str, InputGram],
) -> dict[str, np.ndarray]:
    """Weight name -> the sum of ``X^T X`` over its readers (the output error of all of them
    is minimized), for weights that every reader lets GPTQ round."""
    found: dict[str, np.ndarray] = {}
    to_nearest = set()
    for node, annotation in annotated.items():
        weight = node.inputs[annotation.weight].name
        if node.name not in rounded_by_gptq:
            to_nearest.add(weight)
            continue
        gram = grams[rounded_by_gptq[node.name]].gram
        found[weight] = gram if weight not in found else found[weight] + gram
    return {weight: gram for weight, gram in found.items() if weight not in to_nearest}


def _wider(current: QuantSpec | None, new: QuantSpec) -> QuantSpec:
    """Of two specs two consumers want for one tensor, the one with more bits."""
    if current is None or new.width > current.width:
        return new
    return current


class _QDQBuilder:
    """Creates the Q/DQ nodes and quantized initializers of one graph, sharing what it can."""

    def __init__(self, model: ir.Model, per_consumer: bool, grams: dict[str, np.ndarray]) -> None:
        self.model = model
        self.graph = model.graph
        self.per_consumer = per_consumer
        self.grams = grams
        self.gptq_weights = 0
        self.activations: dict[str, ir.Value] = {}
        self.tables: dict[str, tuple[ir.Value, QuantizedTensor]] = {}
        self.weights: dict[tuple[str, QuantSpec], tuple[ir.Value, np.ndarray]] = {}
        self.quantized: dict[tuple[str, QuantSpec], QuantizedTensor] = {}
        self.activation_pairs = 0
        self.biases = 0

    def static_activation(self, node: ir.Node, index: int, found: ActivationQuantization) -> None:
        value = node.inputs[index]
        key = f"{value.name}/{node.name}" if self.per_consumer else value.name
        if key not in self.activations:
            suffix = f"_{node.name}" if self.per_consumer else ""
            self.activations[key] = self._activation_pair(value, found, suffix)
        node.replace_input_with(index, self.activations[key])

    def _activation_pair(
        self, value: ir.Value, found: ActivationQuantization, suffix: str
    ) -> ir.Value:
        """Insert ``DQ(Q(value))`` after ``value``'s producer; the dequantized value."""
        scale = self._constant(f"{value.name}{suffix}_scale", found.scale)
        zero_point = self._constant(f"{value.name}{suffix}_zero_point", found.zero_point)
        domain = self._qdq_domain(found.spec)
        quantize = ir.Node(
            domain, "QuantizeLinear", [value, scale, zero_point], name=f"{value.name}{suffix}_Q"
        )
        dequantize = ir.Node(
            domain,
            "DequantizeLinear",
            [quantize.outputs[0], scale, zero_point],
            name=f"{value.name}{suffix}_DQ",
        )
        self._name_outputs(quantize, dequantize, value, found.spec.dtype, suffix)
        self._insert_after(value, [quantize, dequantize])
        self.activation_pairs += 1
        return dequantize.outputs[0]

    def output_activation(self, node: ir.Node, found: ActivationQuantization) -> None:
        """Make a ``QuantizeLinear`` the only reader of ``node``'s output, unless a Q already
        reads it alone, or through a Relu whose only reader is a Q (onnxruntime folds that
        Relu into the Q): every other reader reads the dequantized output instead."""
        value = node.outputs[0]
        if _feeds_quantize_alone(value):
            return
        readers = [(user, index) for user, index in value.uses() if not _is_quantize(user)]
        key = value.name if not self.per_consumer else f"{value.name}/"
        if key not in self.activations:
            self.activations[key] = self._activation_pair(value, found, "_output")
        for user, index in readers:
            user.replace_input_with(index, self.activations[key])

    def _qdq_domain(self, spec: QuantSpec) -> str:
        """The default domain where its opset carries ``spec``, else onnxruntime's
        ``com.microsoft`` Q/DQ (16-bit types at any opset)."""
        if self.model.opset_imports.get("", 0) >= spec.min_opset:
            return ""
        self.model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return MICROSOFT_DOMAIN

    def dynamic_activation(self, node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        if value.name not in self.activations:
            quantize = ir.Node(
                "", "DynamicQuantizeLinear", [value], num_outputs=3, name=f"{value.name}_DynQ"
            )
            dequantize = ir.Node(
                "", "DequantizeLinear", list(quantize.outputs), name=f"{value.name}_DQ"
            )
            parts = ("quantized", "scale", "zero_point")
            for output, part in zip(quantize.outputs, parts, strict=True):
                output.name = f"{value.name}_{part}"
            scale, zero_point = quantize.outputs[1:]
            scale.dtype, scale.shape = ir.DataType.FLOAT, ir.Shape([])
            zero_point.dtype, zero_point.shape = ir.DataType.UINT8, ir.Shape([])
            self._name_outputs(quantize, dequantize, value, ir.DataType.UINT8, "")
            self._insert_after(value, [quantize, dequantize])
            self.activations[value.name] = dequantize.outputs[0]
            self.activation_pairs += 1
        node.replace_input_with(index, self.activations[value.name])

    def weight(self, node: ir.Node, index: int, spec: QuantSpec) -> np.ndarray:
        """Replace the weight input with DQ(quantized weight); return the weight's scale."""
        value = node.inputs[index]
        table = transposed_table(value)
        if table is not None:
            return self._tied_weight(node, index, table, spec)
        key = (value.name, spec)
        if key not in self.weights:
            quantized = self.quantized_weight(node, value, spec)
            name = self._unused(value.name, "_quantized")
            output = self._dequantized_constant(name, quantized, spec, node)
            output.producer().meta[FLOAT_SOURCE_KEY] = value
            self.weights[key] = (output, quantized.scale)
        output, scale = self.weights[key]
        node.replace_input_with(index, output)
        return scale

    def _tied_weight(
        self, node: ir.Node, index: int, table: ir.Value, spec: QuantSpec
    ) -> np.ndarray:
        """A MatMul weight ``Transpose(E)`` of a table ``E`` an embedding may share: ``E`` is
        quantized per row (the MatMul's output channels), read as ``DQ(Transpose(E_q))``, which
        onnxruntime folds into a constant it multiplies in integers."""
        original = node.inputs[index]
        quantized_table = self._table(table, dataclasses.replace(spec, axis=0))
        transpose = ir.Node("", "Transpose", [quantized_table], [ir.AttrInt64s("perm", [1, 0])])
        transpose.name = transpose.outputs[0].name = f"{table.name}_quantized_transposed"
        scale = self._constant(f"{table.name}_row_scale", self.tables[table.name][1].scale)
        zero_point = self._constant(
            f"{table.name}_row_zero_point", self.tables[table.name][1].zero_point, spec.dtype
        )
        dequantize = ir.Node(
            "",
            "DequantizeLinear",
            [transpose.outputs[0], scale, zero_point],
            [ir.AttrInt64("axis", 1)],
            name=f"{table.name}_transposed_DQ",
        )
        dequantize.outputs[0].name = f"{table.name}_transposed_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.meta[FLOAT_SOURCE_KEY] = original
        self.graph.insert_before(node, [transpose, dequantize])
        node.replace_input_with(index, dequantize.outputs[0])
        return self.tables[table.name][1].scale

    def _table(self, table: ir.Value, spec: QuantSpec) -> ir.Value:
        """The integer copy of embedding table ``table`` (per-row ``spec``), made once."""
        if table.name not in self.tables:
            quantized = quantize_weight(table.const_value.numpy(), spec)
            values = self._constant(f"{table.name}_quantized", quantized.values, spec.dtype)
            self.tables[table.name] = (values, quantized)
        return self.tables[table.name][0]

    def embedding(self, node: ir.Node, spec: QuantSpec) -> str | None:
        """Gather integer rows and scale them: ``(Gather(E_q) - z) * Gather(s)``; the reason
        the Gather stays float where its table would then be stored twice."""
        table = node.inputs[0]
        others = [u.node for u in table.uses() if u.node.op_type != "Gather"]
        floats = [o for o in others if o.op_type != "Transpose" or o.outputs[0].uses()]
        if floats:
            names = ", ".join(f"'{other.name}'" for other in floats)
            return f"its table '{table.name}' is also read in float by {names}"
        values = self._table(table, spec)
        quantized = self.tables[table.name][1]
        rows = ir.Node("", "Gather", [values, node.inputs[1]], name=f"{node.name}_rows")
        scale = self._constant(f"{table.name}_scale_column", quantized.scale.reshape(-1, 1))
        row_scales = ir.Node("", "Gather", [scale, node.inputs[1]], name=f"{node.name}_scales")
        nodes = [rows, row_scales]
        as_float = ir.Node("", "Cast", rows.outputs, [ir.AttrInt64("to", ir.DataType.FLOAT)])
        nodes.append(as_float)
        centered = as_float.outputs[0]
        if np.any(quantized.zero_point):
            zero_point = quantized.zero_point.astype(np.float32).reshape(-1, 1)[:1]
            zero = self._constant(f"{table.name}_zero", zero_point)
            subtract = ir.Node("", "Sub", [centered, zero])
            nodes.append(subtract)
            centered = subtract.outputs[0]
        scaled = ir.Node("", "Mul", [centered, row_scales.outputs[0]], name=f"{node.name}_scaled")
        nodes.append(scaled)
        for extra in nodes[2:-1]:
            extra.name = f"{node.name}_{extra.op_type.lower()}"
        self.graph.insert_before(node, nodes)
        output = node.outputs[0]
        scaled.outputs[0].dtype, scaled.outputs[0].shape = output.dtype, output.shape
        ir.convenience.replace_all_uses_with(output, scaled.outputs[0], replace_graph_outputs=True)
        name = output.name
        output.name = f"{name}_float_gather"
        scaled.outputs[0].name = name
        self.graph.remove(node, safe=True)
        return None

    def quantized_weight(self, node: ir.Node, value: ir.Value, spec: QuantSpec) -> QuantizedTensor:
        """The weight ``value`` of ``node`` quantized to ``spec``, computed once (the graph is
        not touched: a bias check reads its scale before deciding)."""
        key = (value.name, spec)
        if key not in self.quantized:
            self.quantized[key] = self._quantized_weight(node, value, spec)
        return self.quantized[key]

    def _quantized_weight(self, node: ir.Node, value: ir.Value, spec: QuantSpec) -> QuantizedTensor:
        """GPTQ where its ``X^T X`` was collected, else round to nearest."""
        array = value.const_value.numpy()
        gram = self.grams.get(value.name)
        if gram is None:
            return quantize_weight(array, spec)
        self.gptq_weights += 1
        return gptq_quantize(array, gram, spec, WEIGHT_LAYOUTS[node.op_type].reduction_axis(node))

    def bias(
        self, node: ir.Node, index: int, input_scale: np.ndarray, weight_scale: np.ndarray
    ) -> None:
        value = node.inputs[index]
        vector = value.const_value.numpy().reshape(-1)  # Gemm reads C [1, N] and [N] alike
        quantized = quantize_bias(vector, float(input_scale), weight_scale)
        spec = QuantSpec(ir.DataType.INT32, symmetric=True, axis=0)
        self.biases += 1
        output = self._dequantized_constant(f"{value.name}_{node.name}", quantized, spec, node)
        output.producer().meta[FLOAT_SOURCE_KEY] = value
        node.replace_input_with(index, output)

    def _dequantized_constant(
        self, name: str, quantized: QuantizedTensor, spec: QuantSpec, before: ir.Node
    ) -> ir.Value:
        values = self._constant(f"{name}_quantized", quantized.values, spec.dtype)
        scale = self._constant(f"{name}_scale", quantized.scale)
        zero_point = self._constant(f"{name}_zero_point", quantized.zero_point, spec.dtype)
        attributes = []
        if spec.axis is not None and quantized.scale.ndim > 0:
            attributes.append(ir.AttrInt64("axis", spec.axis))
        if spec.block_size is not None:
            attributes.append(ir.AttrInt64("block_size", spec.block_size))
        dequantize = ir.Node(
            "", "DequantizeLinear", [values, scale, zero_point], attributes, name=f"{name}_DQ"
        )
        dequantize.outputs[0].name = f"{name}_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.outputs[0].shape = ir.Shape(quantized.values.shape)
        self.graph.insert_before(before, dequantize)
        return dequantize.outputs[0]

    def _unused(self, stem: str, suffix: str) -> str:
        """``stem``, or ``stem_2``, ``stem_3``... whichever has no ``stem + suffix`` yet."""
        name, count = stem, 1
        while f"{name}{suffix}" in self.graph.initializers:
            count += 1
            name = f"{stem}_{count}"
        return name

    def _constant(self, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        tensor = ir.Tensor(np.array(array, order="C"), dtype=dtype, name=name)  # keeps 0-d
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def _name_outputs(
        self,
        quantize: ir.Node,
        dequantize: ir.Node,
        value: ir.Value,
        dtype: ir.DataType,
        suffix: str,
    ) -> None:
        quantize.outputs[0].name = f"{value.name}{suffix}_quantized"
        quantize.outputs[0].dtype = dtype
        quantize.outputs[0].shape = value.shape
        dequantize.outputs[0].name = f"{value.name}{suffix}_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.outputs[0].shape = value.shape

    def _insert_after(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, nodes)
        else:
            self.graph.insert_before(self.graph.node(0), nodes)


BUILDERS: dict[str, PassBuilder] = {
    "insert-qdq": lambda ctx: (
        None
        if ctx.options.quantization is None
        else InsertQDQPass(
            ctx.target, ctx.options.quantization, progress=ctx.options.calibration_progress
        )
    ),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
