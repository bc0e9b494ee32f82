"""Softmax floor: logits far below their row's maximum raised to a floor, so that the runtime's
exp makes no subnormal numbers.

onnxruntime's Softmax on x86 computes ``e^(x_j - m)``, ``m = max_k x_k``, with the argument
clamped at -88.38. Every logit more than ``SUBNORMAL_GAP`` = 87.34 (``-ln FLT_MIN``) below its
row's maximum gives a subnormal ``e^(x_j - m)``: each masked position of an attention whose mask
adds -10^4 or the float minimum does. An x86 core takes a microcode assist for each subnormal
result or operand unless FTZ/DAZ are set, which onnxruntime does only on its pool threads, and
only when asked (``session.set_denormal_as_zero``). Measured (Xeon family 6 model 207, one
thread): a Softmax over [16, 12, 128, 128] logits ran 0.96 ms unmasked, 7.4 ms with half of
them masked, and 2.3 ms masked after this rewrite; MiniLM on its padded evaluation batch spent
30 of 137 ms in its six Softmax ops.

The rewrite, with ``F = FLOOR`` = 60::

    y = Softmax(x, axis)  ->  y = Softmax(Max(x, ReduceMax(x, axis, keepdims=1) - F), axis)

It changes only the logits below ``m - F``: each such ``e^(x_j - m) < e^-F`` becomes ``e^-F``.
The denominator ``S >= 1`` grows by at most ``n e^-F`` over a row of ``n`` logits, so every
output moves by at most ``n e^-F`` = ``n`` x 8.8e-27 in absolute terms: below a float32 step
of any probability for rows shorter than 10^18. ``e^-F`` is a normal number, and so is each
floored output ``e^-F / S >= e^-F / n`` for rows shorter than 7 x 10^11. A row whose maximum
is itself -inf or the float minimum is left as it was (``m - F`` rounds to ``m``).

Flooring costs two more passes over the logits (0.96 -> 2.3 ms unmasked, above), so it pays
only where enough logits fall that far, and where the CPU pays for subnormals. The pass reads
each Softmax's input on the first calibration batch. Where no logit falls ``SUBNORMAL_GAP``
below its row's maximum it leaves the Softmax alone. Otherwise, on a target of this host, it
times both forms on (up to ``SAMPLE_ELEMENTS`` of) those logits, one thread, alternating, and
floors where that is at least ``MIN_GAIN`` faster. Without timing (``--no-measure``, or a
target of another host), it floors where at least ``BREAK_EVEN_SHARE`` of the logits fall
that far: on the host above, the floor's cost equals the assists of 10% of the logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.data import DataSource, input_specs, read_batches
from qgraph.graph.building import fresh_initializer
from qgraph.graph.ops import onnx_opset
from qgraph.passes.fusion.reductions import AXES_AS_INPUT_OPSET
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.calibration import collect
from qgraph.recipe import QuantOptions
from qgraph.stopwatch import alternating_medians
from qgraph.targets import is_host_target

logger = logging.getLogger(__name__)

FLOOR = 60.0
"""How far below its row's maximum a logit is raised to (module docstring)."""
SUBNORMAL_GAP = float(-np.log(np.finfo(np.float32).tiny))
"""Logits further than this below their row's maximum make subnormal exps (87.34)."""
BREAK_EVEN_SHARE = 0.1
"""Untimed: the share of logits that far below at which flooring pays (module docstring)."""
MIN_GAIN = 0.1
"""Timed: the floored Softmax must take at most 90% of the time of the Softmax as it was."""
SAMPLE_ELEMENTS = 1 << 22
"""At most this many logits (16 MB), in whole rows, are kept for timing."""
READ_BYTES = 1 << 30
"""At most about this many bytes of logits are read from one run of the model: attention
scores grow with the square of the context (32 heads over 2048 positions: 512 MB a layer).
The first Softmax's are read alone, to learn their size."""


@dataclasses.dataclass(frozen=True)
class SoftmaxVerdict:
    """What the pass found at one Softmax, and whether it floored its logits."""

    node: str
    share: float
    """Of its logits on the first calibration batch, those ``SUBNORMAL_GAP`` below their row's
    maximum."""
    seconds: tuple[float, float] | None
    """(as it was, floored), timed on those logits; None where not timed."""
    floored: bool


@dataclasses.dataclass(frozen=True)
class SoftmaxFloorReport:
    """Each Softmax's verdict, or why none was examined."""

    verdicts: tuple[SoftmaxVerdict, ...] = ()
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped is not None:
            return f"no Softmax examined: {self.skipped}"
        floored = [v for v in self.verdicts if v.floored]
        share = max(v.share for v in self.verdicts)
        found = (
            f"up to {share:.0%} of their logits lie {SUBNORMAL_GAP:.0f} below their row's "
            "maximum on the first calibration batch, where exp makes subnormal numbers"
        )
        if not share:
            found = f"none of their logits lies {SUBNORMAL_GAP:.0f} below its row's maximum"
        done = f"{len(floored)} of {len(self.verdicts)} Softmax floored at the row maximum - "
        return f"{done}{FLOOR:.0f}: {found}{self._timing()}"

    def _timing(self) -> str:
        timed = [v.seconds for v in self.verdicts if v.seconds is not None]
        if not timed:
            untimed = any(v.share for v in self.verdicts)
            rule = f"; not timed: floored where {BREAK_EVEN_SHARE:.0%} of them lie that far"
            return rule if untimed else ""
        before, after = (sum(times) * 1e3 for times in zip(*timed, strict=True))
        return f"; timed here: {before:.2f} ms as they were, {after:.2f} ms floored"


class _Logits:
    """A Softmax input on one batch: the share of its logits far below their row's maximum,
    and a sample of its rows (as a [rows, row length] matrix) to time it on."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.share = 0.0
        self.sample = np.zeros((0, 0), np.float32)
        self.nbytes = 0

    def update(self, x: np.ndarray) -> None:
        self.nbytes = x.nbytes
        if x.size == 0 or x.dtype != np.float32:  # float32 constants could not floor it
            return
        rows = np.moveaxis(x, self.axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        with np.errstate(invalid="ignore"):  # a row of -inf: -inf - -inf is nan, not below
            gaps = rows - rows.max(axis=1, keepdims=True)
        self.share = float(np.mean(gaps < -SUBNORMAL_GAP))
        kept = max(1, SAMPLE_ELEMENTS // rows.shape[1])
        self.sample = np.ascontiguousarray(rows[:kept], dtype=np.float32)


class SoftmaxFloorPass(ir.passes.InPlacePass):
    """Floor the logits of each Softmax where that is faster (module docstring)."""

    def __init__(self, options: QuantOptions, timed: bool) -> None:
        super().__init__()
        self.options = options
        self.timed = timed

    def call(self, model: ir.Model) -> ReportingPassResult:
        softmaxes = [n for n in model.graph if _is_float_softmax(n)]
        if not softmaxes:  # nothing to say in the report
            return ReportingPassResult(model, False)
        skipped = self._skipped()
        if skipped is not None:
            return ReportingPassResult(model, False, SoftmaxFloorReport(skipped=skipped))
        logits = _first_batch_logits(model, softmaxes, self.options.calib)
        verdicts = []
        for node in softmaxes:
            verdict = self._verdict(node, logits[node.inputs[0].name], model)
            if verdict.floored:
                _floor(model.graph, node, _axis(node), _opset(model))
            verdicts.append(verdict)
        report = SoftmaxFloorReport(tuple(verdicts))
        logger.info("%s", report.summary())
        return ReportingPassResult(model, any(v.floored for v in verdicts), report)

    def _skipped(self) -> str | None:
        """Why the pass examines none of the model's Softmax (None if it does)."""
        calib = self.options.calib
        if calib is None:
            return "no calibration data to find masked logits in"
        if not isinstance(calib, (str, os.PathLike)) and iter(calib) is calib:
            return "the calibration data is a one-shot iterator, which calibration reads"
        return None

    def _verdict(self, node: ir.Node, logits: _Logits, model: ir.Model) -> SoftmaxVerdict:
        name = node.name or node.inputs[0].name
        if logits.share == 0.0:
            return SoftmaxVerdict(name, logits.share, None, False)
        if not self.timed:
            return SoftmaxVerdict(name, logits.share, None, logits.share >= BREAK_EVEN_SHARE)
        before, after = _timed(logits.sample, model)
        return SoftmaxVerdict(name, logits.share, (before, after), after <= (1 - MIN_GAIN) * before)


def _first_batch_logits(
    model: ir.Model, softmaxes: list[ir.Node], calib: DataSource
) -> dict[str, _Logits]:
    """Each Softmax's ``_Logits`` on the first calibration batch, by input name, read in runs
    of at most about ``READ_BYTES``."""
    first = next(read_batches(calib, input_specs(model.graph)))
    found: dict[str, _Logits] = {}
    pending, count = list(softmaxes), 1
    while pending:
        group, pending = pending[:count], pending[count:]
        wanted = {node.inputs[0].name: _Logits(_axis(node)) for node in group}
        found.update(collect(model, wanted, [first]))
        largest = max(logits.nbytes for logits in wanted.values())
        count = max(1, READ_BYTES // max(largest, 1))
    return found


def _axis(node: ir.Node) -> int:
    return node.attributes.get_int("axis", -1)


def _is_float_softmax(node: ir.Node) -> bool:
    """A Softmax whose logits are float32, or of a type not inferred (the calibration run
    tells: ``_Logits`` takes float32 only)."""
    return (
        node.op_type == "Softmax"
        and node.domain == ""
        and node.inputs[0] is not None
        and node.inputs[0].dtype in (ir.DataType.FLOAT, None)
    )


def _opset(model: ir.Model) -> int:
    """The model's default-domain opset: at least 13 here (``Fact.OPSET``), where Softmax
    normalizes over its one ``axis``."""
    return onnx_opset(model.opset_imports)


def _floor(graph: ir.Graph, node: ir.Node, axis: int, opset: int) -> None:
    """``node``'s input ``x`` replaced by ``Max(x, ReduceMax(x, axis) - FLOOR)``."""
    x = node.inputs[0]
    stem = x.name or "softmax_logits"
    floor = fresh_initializer(graph, f"{stem}_floor", np.array(FLOOR, np.float32))
    keep = ir.AttrInt64("keepdims", 1)
    if opset >= AXES_AS_INPUT_OPSET:
        listed = fresh_initializer(graph, f"{stem}_axes", np.array([axis], np.int64))
        reduce = ir.Node("", "ReduceMax", [x, listed], [keep], name=f"{stem}_RowMax")
    else:
        attributes = [ir.AttrInt64s("axes", [axis]), keep]
        reduce = ir.Node("", "ReduceMax", [x], attributes, name=f"{stem}_RowMax")
    lowest = ir.Node("", "Sub", [reduce.outputs[0], floor], name=f"{stem}_Floor")
    floored = ir.Node("", "Max", [x, lowest.outputs[0]], name=f"{stem}_Floored")
    for made, suffix in ((reduce, "row_max"), (lowest, "floor_value"), (floored, "floored")):
        made.outputs[0].name = f"{stem}_{suffix}"
        made.outputs[0].dtype = ir.DataType.FLOAT
    floored.outputs[0].shape = x.shape
    graph.insert_before(node, [reduce, lowest, floored])
    node.replace_input_with(0, floored.outputs[0])


def _timed(rows: np.ndarray, model: ir.Model) -> tuple[float, float]:
    """Median seconds of a Softmax over the last axis of ``rows``, as it was and floored, in
    ``model``'s opset and IR version."""
    models = [_row_softmax(rows.shape, model, floored) for floored in (False, True)]
    before, after = alternating_medians(models, {"x": rows})
    return before, after


def _row_softmax(shape: tuple[int, ...], model: ir.Model, floored: bool) -> onnx.ModelProto:
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    softmax = ir.Node("", "Softmax", [x], [ir.AttrInt64("axis", -1)], name="softmax")
    softmax.outputs[0].name = "y"
    opsets = {"": _opset(model)}
    graph = ir.Graph([x], softmax.outputs, nodes=[softmax], opset_imports=opsets, name="rows")
    if floored:
        _floor(graph, softmax, -1, _opset(model))
    return ir.to_proto(ir.Model(graph, ir_version=model.ir_version))


def _build(ctx) -> SoftmaxFloorPass | None:
    quantization = ctx.options.quantization
    if quantization is None or not ctx.target.runtime.slow_subnormals:
        return None
    return SoftmaxFloorPass(quantization, quantization.measure and is_host_target(ctx.target))


BUILDERS: dict[str, PassBuilder] = {
    "floor-softmax-logits": _build,
}
"""What makes this module's pass (a row of ``qgraph.passes.PIPELINE``)."""
