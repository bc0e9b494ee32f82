"""SmoothQuant (Xiao et al., arXiv 2211.10438): move activation outliers into the weights.

A few channels of a transformer's activations are 10-100x larger than the rest, so one
per-tensor 8-bit scale spends its range on them. For an activation ``X`` (channels ``j``) read
by weighted ops with weights ``W`` (input channels ``j``):

    X W = (X diag(s)^-1) (diag(s) W),       s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

``max|X_j|`` comes from calibration data; ``max|W_j|`` is taken over every reader of ``X`` the
target quantizes, so readers of one tensor (Q, K and V) share one ``s``. Every reader that
can (``readers.py``: MatMul, Gemm, Conv with a constant weight) takes ``diag(s)``; ``X / s``
is folded into what produces ``X`` (``folding.py``: a norm's gamma and beta, a MatMul's output
columns, a SwiGLU's up projection...) where every reader of ``X`` takes ``diag(s)``, and is a
``Mul`` inserted before those readers otherwise. ``alpha`` is fixed, or searched per tensor
(``scales.py``).

Only tensors a reader of which the target quantizes are smoothed: the pass asks the annotate
pass's ``decide``, which reads the target and the user's exclusions. It runs in the
float-rewrites phase; the Q/DQ pass calibrates again afterwards, on the smoothed model. Tensors
are visited in graph order, each scale from the weights as earlier tensors left them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

import numpy as np
import onnx_ir as ir
from rich.console import RenderableType

from qgraph.data import DataSource
from qgraph.options import CalibrationProgress
from qgraph.passes.annotate import AnnotatePass, NodeAnnotation
from qgraph.passes.qdq.calibrate import CalibratingPass, calibration_data, counting_batches
from qgraph.passes.smoothquant.folding import (
    Channels,
    Rescale,
    apply,
    fold_plan,
    insert_division,
)
from qgraph.passes.smoothquant.readers import (
    READER_LAYOUTS,
    channel_maxima,
    reader_problem,
    reader_product,
    weight_of,
)
from qgraph.passes.smoothquant.scales import AlphaSearch, QuantizedReader, smoothing_scale
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.calibration import CalibrationError, ChannelStatistics, collect
from qgraph.recipe import AUTO_ALPHA, Mode, QuantOptions
from qgraph.sections import table
from qgraph.targets import TargetSpec

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 256
"""Rows of a MatMul or Gemm input kept for the alpha search."""
SAMPLE_IMAGES = 4
"""Images of a Conv input kept for the alpha search."""


@dataclasses.dataclass(frozen=True)
class SmoothedTensor:
    """One smoothed activation: its readers, alpha, where ``X / s`` went, and (search) SQNRs."""

    name: str
    readers: tuple[str, ...]
    alpha: float
    placement: str
    """Where ``X / s`` went: the producer it folded into, or why a Mul was inserted."""
    folded: bool
    sqnr_db: tuple[float, float] | None = None
    """With ``alpha = auto``: the readers' expected output SQNR without and with smoothing."""


@dataclasses.dataclass
class SmoothQuantReport:
    """What the SmoothQuant pass did, tensor by tensor."""

    smoothed: list[SmoothedTensor] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Tensor name -> why it was left as it was."""
    calibration_batches: int = 0

    @property
    def folded(self) -> int:
        return sum(tensor.folded for tensor in self.smoothed)

    def summary(self) -> str:
        """How many activations were smoothed, how, with which alphas."""
        alphas = collections.Counter(tensor.alpha for tensor in self.smoothed)
        chosen = ", ".join(f"{alpha:g} x{count}" for alpha, count in sorted(alphas.items()))
        line = (
            f"SmoothQuant: {len(self.smoothed)} activations smoothed (alpha {chosen or '-'}), "
            f"{self.folded} folded into their producers, {len(self.smoothed) - self.folded} "
            f"through an inserted Mul; {len(self.skipped)} left as they were"
        )
        searched = [tensor.sqnr_db for tensor in self.smoothed if tensor.sqnr_db is not None]
        if searched:
            gain = sum(after - before for before, after in searched) / len(searched)
            line += f"; the search expects +{gain:.1f} dB output SQNR on average"
        return line

    def explanation(self, pass_name: str) -> list[RenderableType]:
        """Every activation looked at: alpha and where ``X / s`` went, or why not."""
        made = table("activation", "alpha", "where X / s went (or why left)", title="SmoothQuant")
        for tensor in self.smoothed:
            made.add_row(tensor.name, f"{tensor.alpha:g}", tensor.placement)
        for name, reason in self.skipped.items():
            made.add_row(name, "-", reason)
        return [made]


@dataclasses.dataclass
class _Candidate:
    """An activation that a quantized reader reads, with its readers sorted out."""

    value: ir.Value
    channels: Channels
    quantized: list[tuple[ir.Node, NodeAnnotation]]
    """Readers that take ``diag(s)`` and that the target quantizes (they set ``s``)."""
    readers: list[ir.Node]
    """Every reader that takes ``diag(s)``, quantized or not."""

    @property
    def whole(self) -> bool:
        """Whether every reader takes ``diag(s)`` (so ``X / s`` may fold into the producer)."""
        return len(self.readers) == len(self.value.uses()) and not self.value.is_graph_output()


class SmoothQuantPass(CalibratingPass):
    """Smooth every activation the target quantizes, with a fixed or searched alpha."""

    def __init__(
        self,
        target: TargetSpec,
        options: QuantOptions,
        progress: CalibrationProgress | None = None,
    ) -> None:
        super().__init__(target, options, progress)
        self.annotate = AnnotatePass(target, options)

    @property
    def searching(self) -> bool:
        return self.options.smoothquant == AUTO_ALPHA

    def call(self, model: ir.Model) -> ReportingPassResult:
        report = SmoothQuantReport()
        candidates = self._candidates(model.graph, report)
        if not candidates:
            return ReportingPassResult(model, modified=False, details=report)
        statistics = collect(
            model,
            {c.value.name: self._statistics(c) for c in candidates},
            self._data(model),
            progress=counting_batches(report, self.progress),
        )
        for candidate in candidates:
            outcome = self._smooth(candidate, statistics[candidate.value.name])
            if isinstance(outcome, str):
                report.skipped[candidate.value.name] = outcome
            else:
                report.smoothed.append(outcome)
        logger.info(
            "smoothed %d activations, skipped %d", len(report.smoothed), len(report.skipped)
        )
        return ReportingPassResult(model, modified=bool(report.smoothed), details=report)

    def _candidates(self, graph: ir.Graph, report: SmoothQuantReport) -> list[_Candidate]:
        """Activations read by a quantized reader, in graph order; others' reasons in ``report``."""
        found: dict[str, _Candidate | str] = {}
        for node in graph:
            decision = self.annotate.decide(node)
            if not isinstance(decision, NodeAnnotation) or decision.activation is None:
                continue
            value = node.inputs[decision.activation]
            if value.name not in found:
                found[value.name] = self._candidate(value)
        report.skipped.update((name, c) for name, c in found.items() if isinstance(c, str))
        return [c for c in found.values() if isinstance(c, _Candidate)]

    def _candidate(self, value: ir.Value) -> _Candidate | str:
        uses = list(dict.fromkeys(node for node, _ in value.uses()))
        decisions = {node: self.annotate.decide(node) for node in uses}
        readers = [node for node in uses if reader_problem(node, value) is None]
        quantized = [
            (node, decisions[node])
            for node in readers
            if isinstance(decisions[node], NodeAnnotation)
        ]
        if not quantized:
            first = next(n for n in uses if isinstance(decisions[n], NodeAnnotation))
            return reader_problem(first, value) or "no quantized reader can take diag(s)"
        rank = len(value.shape)
        first = quantized[0][0]
        axis = READER_LAYOUTS[first.op_type].activation_axis(rank)
        readers = [r for r in readers if READER_LAYOUTS[r.op_type].activation_axis(rank) == axis]
        quantized = [(node, d) for node, d in quantized if node in readers]
        count = weight_of(first).shape[READER_LAYOUTS[first.op_type].weight_axis(first)]
        return _Candidate(value, Channels(count, axis, rank), quantized, readers)

    def _statistics(self, candidate: _Candidate) -> ChannelStatistics:
        rank = candidate.channels.rank
        layout = READER_LAYOUTS[candidate.quantized[0][0].op_type]
        unit_rank = layout.unit_rank(rank)
        size = (SAMPLE_ROWS if unit_rank == 1 else SAMPLE_IMAGES) if self.searching else 0
        return ChannelStatistics(candidate.channels.axis, unit_rank, size)

    def _statistics_problem(self, stats: ChannelStatistics) -> str | None:
        """Why ``stats`` cannot give the tensor a scale (None if they can)."""
        if stats.minimum is None:
            return "the calibration data holds none of its values"
        if not np.all(np.isfinite(stats.absmax)):
            return "its calibrated range is not finite"
        if self.searching and len(stats.sample) == 0:
            return "the calibration data holds a single row or image, too few to search alpha on"
        return None

    def _smooth(self, candidate: _Candidate, stats: ChannelStatistics) -> SmoothedTensor | str:
        problem = self._statistics_problem(stats)
        if problem is not None:
            return problem
        w_max = np.max([channel_maxima(node) for node, _ in candidate.quantized], axis=0)
        alpha, sqnr = self.options.smoothquant, None
        if self.searching:
            result = self._search(candidate, stats).best(w_max)
            sqnr = (result.sqnr_unsmoothed, result.sqnr_chosen)
            if result.alpha is None:
                return (
                    "no alpha lowers its readers' quantization error "
                    f"(output SQNR {result.sqnr_unsmoothed:.1f} dB unsmoothed)"
                )
            alpha = result.alpha
        scale = smoothing_scale(stats.absmax, w_max, alpha)
        folded, placement = self._divide(candidate, scale)
        for reader in candidate.readers:
            axis = READER_LAYOUTS[reader.op_type].weight_axis(reader)
            apply(Rescale(reader, 1, axis, 1), scale)
        names = tuple(reader.name or reader.op_type for reader in candidate.readers)
        return SmoothedTensor(candidate.value.name, names, alpha, placement, folded, sqnr)

    def _divide(self, candidate: _Candidate, scale: np.ndarray) -> tuple[bool, str]:
        """Put ``X / s`` in the graph: whether it folded, and where it went."""
        fold = (
            fold_plan(candidate.value, candidate.channels)
            if candidate.whole
            else "it has readers that cannot take diag(s)"
        )
        if isinstance(fold, str):
            insert_division(candidate.value, candidate.readers, scale, candidate.channels)
            return False, f"Mul inserted: {fold}"
        for rescale in fold:
            apply(rescale, scale)
        first = fold[0].node
        return True, f"folded into {first.op_type} '{first.name}'"

    def _search(self, candidate: _Candidate, stats: ChannelStatistics) -> AlphaSearch:
        readers = [
            QuantizedReader(reader_product(node, stats.sample), weight_of(node), d.weight_spec)
            for node, d in candidate.quantized
        ]
        return AlphaSearch(stats, readers, candidate.quantized[0][1].activation_spec)

    def _data(self, model: ir.Model) -> DataSource:
        calib = self.options.calib
        reread = calib is not None and self.options.mode is Mode.STATIC
        if reread and not isinstance(calib, (str, os.PathLike)) and iter(calib) is calib:
            raise CalibrationError(
                "SmoothQuant and static quantization each read the calibration data: give a "
                "dataset path or a list of batches, not a one-shot iterator"
            )
        return calibration_data(self.options, model, "SmoothQuant", "leave out --smoothquant")


def _build(ctx) -> SmoothQuantPass | None:
    quantization = ctx.options.quantization
    if quantization is None or quantization.smoothquant is None:
        return None
    return SmoothQuantPass(ctx.target, quantization, ctx.options.calibration_progress)


BUILDERS: dict[str, PassBuilder] = {
    "smoothquant": _build,
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
