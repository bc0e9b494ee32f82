"""Insert Q/DQ: turn the annotate pass's specs into QuantizeLinear / DequantizeLinear nodes.

The pass takes the annotations, calibrates what they quantize (``calibrate.py``: one run over
the data, ranges, 16-bit promotion, GPTQ's ``X^T X``), decides per op whether it can be
quantized (a range to stay float, a bias that would saturate), and has ``build.py`` write the
nodes and initializers.

For every annotated op (see ``passes/annotate.py``):

- its weight ``W`` is quantized offline, ``W_q = clamp(round(W / s_w) + z_w)``, stored as an
  integer initializer, and read through ``DequantizeLinear(W_q, s_w, z_w[, axis, block_size])``;
  with ``weight_rounding = "gptq"``, MatMul and Gemm weights are rounded by GPTQ instead
  (``passes/gptq.py``), from ``X^T X`` of their input collected in the same calibration run
  (an output projection tied to a 4-bit embedding table then gets its own copy of the table,
  which GPTQ fits to the projection, while the embedding reads the table rounded to nearest);
- its activation ``x`` gets ``DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x)``. In
  static mode ``[lo, hi]`` comes from calibration statistics (``qgraph.quant.calibration``) and sets
  ``s_x, z_x`` once; in dynamic mode ``DynamicQuantizeLinear`` computes them per run from the
  tensor's own min/max (uint8, asymmetric);
- its bias ``b`` becomes int32 with scale ``s_x * s_w`` and zero point 0 (static mode).

An activation read by several annotated ops is quantized once (one pair shared by all), unless
the target wants one pair per consumer (``activations.per_consumer``). Readers that are not
annotated keep reading the float tensor. An activation whose calibrated range is not finite
stays in float, and so does the op that reads it. So does one too noisy for 8 bits: where the
expected SQNR ``10 log10(E[x^2] / (s_x^2 / 12))`` (uniform rounding noise, from the calibration
histogram) is under ``min_sqnr_db``, it goes to 16 bits on a target with 16-bit kernels
(``int16_kernels``), and its readers stay in float on any other. The skip input of an
annotated residual ``Add`` is quantized the same way (static mode), sharing the pair of an op
that reads it too.

Degenerate calibration never yields a silent zero model. Scales have a floor
(``qgraph.quant.spec.SCALE_FLOOR``, so ``s_x * s_w`` is a normal float32), and a range under it is a
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

import onnx_ir as ir
import onnx_ir.passes.common as common

from qgraph.graph.traversal import KEEP_FLOAT_KEY
from qgraph.passes.annotate import (
    AnnotationKind,
    EmbeddingAnnotation,
    KeepFloat,
    NodeAnnotation,
    ResidualAnnotation,
    annotation_problems,
    take_annotation,
    transposed_table,
)
from qgraph.passes.qdq.build import QDQBuilder
from qgraph.passes.qdq.calibrate import (
    ActivationQuantization,
    CalibratingPass,
    Calibrator,
    counting_batches,
)
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.spec import INT32_LIMIT, bias_levels
from qgraph.recipe import Mode
from qgraph.sections import QuantizationOutcome

logger = logging.getLogger(__name__)


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
    asked_16_bit: int = 0
    """Activations in 16 bits because the user or the accuracy plan asked."""
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
        if self.asked_16_bit:
            line += f"; {self.asked_16_bit} activations in 16 bits as asked"
        if self.promoted:
            worst = min(self.promoted.values())
            line += (
                f"; {len(self.promoted)} activations in 16 bits, where 8 would have given an "
                f"SQNR as low as {worst:.1f} dB"
            )
        return line


class InsertQDQPass(CalibratingPass):
    """Quantize the weights, activations and biases the annotate pass chose."""

    def call(self, model: ir.Model) -> ReportingPassResult:
        common.NameFixPass()(model)
        graph = model.graph
        annotated = _taken(graph, NodeAnnotation)
        residuals = _taken(graph, ResidualAnnotation)
        embeddings = _taken(graph, EmbeddingAnnotation)
        report = QDQReport()
        calibrator = Calibrator(self.target, self.options, counting_batches(report, self.progress))
        calibration = calibrator.run(model, annotated, residuals)
        report.promoted, report.kept_float = calibration.promoted, calibration.kept_float
        report.asked_16_bit = sum(
            isinstance(found, ActivationQuantization)
            and found.spec.width == 16
            and name not in calibration.promoted
            for name, found in calibration.ranges.items()
        )
        ranges = calibration.ranges
        builder = QDQBuilder(model, self.target.activations.per_consumer, calibration.grams)
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
                reason = f"its skip input stays float: {found.reason}"
                node.metadata_props[KEEP_FLOAT_KEY] = reason
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
        ranges: dict[str, ActivationQuantization | KeepFloat],
        builder: QDQBuilder,
    ) -> str | None:
        """Quantize one annotated node; the reason it stays in float, if it does."""
        index = annotation.activation
        found = None
        if annotation.output_spec is not None and self.options.mode is Mode.STATIC:
            output = ranges[node.outputs[0].name]
            if isinstance(output, KeepFloat):
                return f"{output.reason}, and the runtime fuses {node.op_type} only behind a Q"
        if index is not None and self.options.mode is Mode.STATIC:
            found = ranges[node.inputs[index].name]
            if isinstance(found, KeepFloat):
                return found.reason
            if annotation.bias is not None and not annotation.computed_weight:
                saturated = self._bias_saturates(node, annotation, found, builder)
                if saturated is not None:
                    return saturated
            builder.static_activation(node, index, found)
        elif index is not None:
            builder.dynamic_activation(node, index)
        if annotation.computed_weight:
            second = ranges[node.inputs[annotation.weight].name]
            if isinstance(second, KeepFloat):
                return second.reason
            builder.static_activation(node, annotation.weight, second)
            return None
        weight_scale = builder.weight(
            node, annotation.weight, annotation.weight_spec, annotation.own_weight_copy
        )
        if annotation.bias is not None and found is not None:
            builder.bias(node, annotation.bias, found.scale, weight_scale)
        return None

    def _bias_saturates(
        self,
        node: ir.Node,
        annotation: NodeAnnotation,
        found: ActivationQuantization,
        builder: QDQBuilder,
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


def _taken(graph: ir.Graph, kind: type[AnnotationKind]) -> dict[ir.Node, AnnotationKind]:
    """The ``kind`` annotations of ``graph``'s nodes, in graph order, taken off the nodes."""
    taken = {node: take_annotation(node, kind) for node in graph}
    return {node: found for node, found in taken.items() if found is not None}


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
