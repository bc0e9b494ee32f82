"""Calibration for insert-qdq: what to measure, one run over the data, and what it gives.

From the annotations it collects, in one onnxruntime run over the calibration data
(``qgraph.quant.calibration.collect``), the statistics of every statically quantized activation and,
with GPTQ rounding, ``X^T X`` of every input whose weights GPTQ rounds. Each activation's
statistics become its scale and zero point (``ActivationQuantization``), or the reason its
readers stay in float (``KeepFloat``): a range that is not finite, one a few values dominate,
or 8 bits too noisy (``min_sqnr_db``) on a target without 16-bit kernels, where a target with
them gets the activation promoted to 16 bits instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import onnx_ir as ir

from qgraph.data import DataSource, batch_files
from qgraph.errors import QGraphError
from qgraph.options import CalibrationProgress
from qgraph.passes.annotate import WEIGHT_LAYOUTS, KeepFloat, NodeAnnotation, ResidualAnnotation
from qgraph.passes.gptq import InputGram
from qgraph.quant.calibration import (
    DOMINANCE_RATIO,
    Accumulators,
    TensorStatistics,
    collect,
    dominated,
    estimated_sqnr_db,
    random_batches,
    tensor_range,
)
from qgraph.quant.spec import SCALE_FLOOR, QuantSpec, natural_scale, scale_and_zero_point
from qgraph.recipe import Mode, QuantOptions, WeightRounding
from qgraph.targets import TargetSpec

logger = logging.getLogger(__name__)


class CalibrationMissingError(QGraphError):
    """Static quantization was asked for without calibration data."""


@dataclasses.dataclass(frozen=True)
class ActivationQuantization:
    """The scale and zero point of one statically quantized activation."""

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray


@dataclasses.dataclass
class Calibration:
    """What one calibration run gave insert-qdq."""

    ranges: dict[str, ActivationQuantization | KeepFloat]
    """Activation name -> its scale and zero point, or why its readers stay in float (static
    mode; empty otherwise)."""
    grams: dict[str, np.ndarray]
    """Weight name -> ``X^T X`` summed over its readers, for the weights GPTQ rounds."""
    promoted: dict[str, float] = dataclasses.field(default_factory=dict)
    """Activations quantized to 16 bits, with the SQNR (dB) 8 bits would have had."""
    kept_float: dict[str, float] = dataclasses.field(default_factory=dict)
    """Activations whose readers stayed in float instead, with that SQNR (dB)."""


class CalibratingPass(ir.passes.InPlacePass):
    """A pass that runs the model over the calibration data: its target, the user's options,
    and whom to tell of each batch."""

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


class Calibrator:
    """Calibrates what the annotations of one model quantize, for a target and options."""

    def __init__(
        self, target: TargetSpec, options: QuantOptions, progress: CalibrationProgress
    ) -> None:
        self.target = target
        self.options = options
        self.progress = progress

    def run(
        self,
        model: ir.Model,
        annotated: dict[ir.Node, NodeAnnotation],
        residuals: dict[ir.Node, ResidualAnnotation],
    ) -> Calibration:
        """Calibrate every activation the annotated ops and residual Adds quantize, and the
        inputs of the weights GPTQ rounds."""
        specs = _activation_specs(annotated, residuals)
        rounded_by_gptq = self._gptq_inputs(annotated)
        statistics, grams = self._collect(model, specs, rounded_by_gptq)
        if self.options.weight_rounding is not WeightRounding.GPTQ:
            rounded_by_gptq = _with_enough_rows(rounded_by_gptq, grams)
        calibration = Calibration({}, _weight_grams(annotated, rounded_by_gptq, grams))
        if statistics:
            self._activation_ranges(specs, statistics, calibration)
        return calibration

    def _gptq_inputs(self, annotated: dict[ir.Node, NodeAnnotation]) -> dict[str, str]:
        """Node name -> the input whose ``X^T X`` GPTQ reads, for the annotated ops whose
        weights it rounds: all where asked for, else those whose activation runs as 16-bit
        digits (the weight's rounding is then nearly all of the op's error), if the data
        gives enough rows (``_with_enough_rows``)."""
        everywhere = self.options.weight_rounding is WeightRounding.GPTQ
        inputs = {
            node.name: _gptq_input(node)
            for node, annotation in annotated.items()
            if everywhere or self._as_digits(annotation)
        }
        return {name: source for name, source in inputs.items() if source is not None}

    def _as_digits(self, annotation: NodeAnnotation) -> bool:
        spec = annotation.activation_spec
        return spec is not None and self.target.activations.as_digits(spec.width)

    def _collect(
        self, model: ir.Model, specs: dict[str, QuantSpec], rounded_by_gptq: dict[str, str]
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
            progress=self.progress,
        )
        return statistics, grams

    def _activation_ranges(
        self,
        specs: dict[str, QuantSpec],
        statistics: dict[str, TensorStatistics],
        calibration: Calibration,
    ) -> None:
        """Fill ``calibration`` with the scale and zero point of every statically quantized
        activation, or the reason its readers stay in float."""
        promote = self.options.min_sqnr_db
        ranges = calibration.ranges
        for name, spec in specs.items():
            stats = statistics[name]
            if not stats.finite:
                logger.warning("'%s' held NaN or inf during calibration; left in float", name)
                ranges[name] = KeepFloat(f"the range of '{name}' is not finite")
                continue
            lo, hi = tensor_range(stats, spec.method, percentile=self.options.percentile)
            if dominated(stats, float(natural_scale(lo, hi, spec))):
                ranges[name] = KeepFloat(self._dominated(name, stats))
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
                if sqnr < promote and not self.target.activations.int16_kernels:
                    calibration.kept_float[name] = sqnr
                    ranges[name] = KeepFloat(
                        f"8 bits would give '{name}' an SQNR of {sqnr:.1f} dB, under "
                        f"{promote:g} dB, and the target has no 16-bit kernels"
                    )
                    continue
                if sqnr < promote:
                    spec = dataclasses.replace(spec, dtype=self.target.activations.sixteen_bit_type)
                    scale, zero_point = scale_and_zero_point(lo, hi, spec)
                    calibration.promoted[name] = sqnr
            ranges[name] = ActivationQuantization(spec, scale, zero_point)

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

    def _user_dtype(self, name: str) -> ir.DataType | None:
        return self.options.override(name).dtype


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


def _gptq_input(node: ir.Node) -> str | None:
    """The name of the input whose rows multiply the weight of a MatMul or a Gemm (not
    ``transA``), which GPTQ can round; None for other ops, whose weights go to nearest."""
    transposed = node.attributes.get("transA")
    if node.op_type not in ("MatMul", "Gemm") or (transposed and transposed.as_int()):
        return None
    return node.inputs[WEIGHT_LAYOUTS[node.op_type].activation].name


GPTQ_ROWS_PER_INPUT = 32
"""Calibration rows per weight input below which qgraph does not choose GPTQ by itself: ``X^T X``
from few rows describes the calibration set more than the data (its relative error goes as
``sqrt(K / rows)``), and GPTQ rounds toward it. magika's classifier reads one row a sample,
704 rows for 512 inputs: GPTQ flipped 11 of 2176 held-out top-1 labels, nearest 9."""


def _with_enough_rows(
    rounded_by_gptq: dict[str, str], grams: dict[str, InputGram]
) -> dict[str, str]:
    """``rounded_by_gptq`` without the ops whose input gave fewer than ``GPTQ_ROWS_PER_INPUT``
    rows per input; their weights go to nearest."""
    return {
        node: source
        for node, source in rounded_by_gptq.items()
        if grams[source].rows >= GPTQ_ROWS_PER_INPUT * grams[source].gram.shape[0]
    }


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
