"""Human-readable reports: rich tables for summaries, pass records, targets and passes.

The compile report prints the sections each pass's result carries (``qgraph.sections``), in
run order; it never asks which pass made one.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qgraph.analysis.debugging import DebugReport
from qgraph.compiler import CompileResult
from qgraph.evaluation import Evaluation
from qgraph.inspection import ModelDiff, ModelSummary, TensorInfo
from qgraph.pipeline import PassInfo, PassRecord
from qgraph.sections import (
    Counted,
    Explained,
    QuantizationOutcome,
    Summarized,
    float_reasons_table,
    format_bytes,
    printable,
)
from qgraph.sections import table as _table
from qgraph.stopwatch import thread_words
from qgraph.targets import TargetSpec, Violation
from qgraph.targets.kernel_race import KernelRace


def format_count(count: int) -> str:
    """``1234567 -> '1.23M'``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def summary_report(summary: ModelSummary, *, top_ops: int | None = None) -> RenderableType:
    """What ``qgraph inspect`` prints."""
    header = _table("", "", title=summary.source or "model")
    header.add_row("IR version", str(summary.ir_version))
    header.add_row("producer", summary.producer or "-")
    header.add_row("opsets", ", ".join(f"{d} {v}" for d, v in summary.opsets.items()))
    header.add_row("nodes", str(summary.nodes))
    header.add_row(
        "parameters",
        f"{format_count(summary.parameter_count)} ({format_bytes(summary.parameter_bytes)})",
    )
    header.add_row(
        "quantization",
        f"{summary.quantize_nodes} QuantizeLinear, {summary.dequantize_nodes} DequantizeLinear, "
        f"{sum(summary.quantized_ops.values())} quantized ops",
    )
    parts: list[RenderableType] = [header, _io_table(summary.inputs, summary.outputs)]
    ops = _table("op", "count", "quantized", title="ops")
    for op, count in list(summary.op_histogram.items())[:top_ops]:
        ops.add_row(op, str(count), str(summary.quantized_ops.get(op, "")))
    parts.append(ops)
    params = _table("dtype", "tensors", "elements", "bytes", title="parameters by dtype")
    for stats in summary.parameters:
        params.add_row(
            stats.dtype, str(stats.tensors), format_count(stats.elements), format_bytes(stats.bytes)
        )
    parts.append(params)
    return _spaced(parts)


def _io_table(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> Table:
    table = _table("", "name", "dtype", "shape", title="interface")
    for kind, infos in (("input", inputs), ("output", outputs)):
        for info in infos:
            shape = "?" if info.shape is None else "[" + ", ".join(map(str, info.shape)) + "]"
            table.add_row(kind, info.name, info.dtype, shape)
    return table


def compile_report(
    result: CompileResult, *, verbose: bool, explain: bool = False
) -> RenderableType:
    """What ``qgraph compile`` prints: the summary, with ``verbose`` a row per pass, with
    ``explain`` what each rule did and why it did not apply elsewhere."""
    before, after = result.before, result.after
    table = _table(
        "", "before", "after", title=f"compiled for {result.target.name} in {result.seconds:.2f} s"
    )
    table.add_row("nodes", str(before.nodes), str(after.nodes))
    table.add_row(
        "weights", format_bytes(before.parameter_bytes), format_bytes(after.parameter_bytes)
    )
    table.add_row(
        "quantized ops",
        str(sum(before.quantized_ops.values())),
        str(sum(after.quantized_ops.values())),
    )
    for op in sorted(set(before.op_histogram) | set(after.op_histogram)):
        old, new = before.op_histogram.get(op, 0), after.op_histogram.get(op, 0)
        if old != new:
            table.add_row(f"  {op}", str(old), str(new))
    parts: list[RenderableType] = [table]
    quantization = quantization_report(result.records)
    if quantization is not None:
        parts.append(quantization)
    if result.plan is not None:
        parts.append(result.plan.summary())
    if verbose:
        parts.append(records_report(result.records))
    if explain:
        parts.append(explain_report(result.records))
    changed = sum(record.modified for record in result.records)
    note = f"{changed} of {len(result.records)} passes changed the model"
    if result.saved is not None:
        data = f" + {result.saved.data_path.name}" if result.saved.data_path else ""
        note += f"; wrote {result.saved.path}{data} ({format_bytes(result.saved.total_bytes)})"
    parts.append(note)
    return _spaced(parts)


@dataclasses.dataclass(frozen=True)
class QuantizationCounts:
    """What a quantizing compile did with its candidate ops, after the runtime check."""

    quantized: collections.Counter[str]
    """Quantized ops by op type."""
    left_in_float: dict[str, tuple[str, str]]
    """Node name -> (op type, reason) for each candidate left in float."""
    never_quantized: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    """(op type, reason) -> count of the ops the target never quantizes."""

    @property
    def candidates(self) -> int:
        return self.quantized.total() + len(self.left_in_float)


def quantization_counts(records: Iterable[PassRecord]) -> QuantizationCounts | None:
    """The passes' quantization outcomes added up in run order, or None when no pass
    reported one (a float compile)."""
    outcomes = [r.details.outcome() for r in records if isinstance(r.details, Counted)]
    if not outcomes:
        return None
    total = QuantizationOutcome()
    for outcome in outcomes:
        total.quantized.update(outcome.quantized)
        total.quantized.subtract(outcome.reverted)
        total.left_in_float.update(outcome.left_in_float)
        total.never_quantized.update(outcome.never_quantized)
    return QuantizationCounts(+total.quantized, total.left_in_float, total.never_quantized)


def quantization_report(records: Iterable[PassRecord]) -> RenderableType | None:
    """Ops quantized by type, each pass's summary line, and the weighted ops left in float
    grouped by reason."""
    records = list(records)
    counts = quantization_counts(records)
    if counts is None:
        return None
    ops = _table("op", "quantized", "left in float", title="quantization")
    left = collections.Counter(op for op, _ in counts.left_in_float.values())
    for op in sorted(set(counts.quantized) | set(left)):
        ops.add_row(op, str(counts.quantized.get(op, 0)), str(left.get(op, 0)))
    parts: list[RenderableType] = [ops]
    parts.extend(r.details.summary() for r in records if isinstance(r.details, Summarized))
    if counts.left_in_float:
        parts.append(float_reasons_table(counts.left_in_float))
    return _spaced(parts)


def explain_report(records: Iterable[PassRecord]) -> RenderableType:
    """The ops left in float and why, then each pass's explanation in run order (rules
    applied and near-misses, activations smoothed, rotations placed)."""
    records = list(records)
    parts: list[RenderableType] = []
    counts = quantization_counts(records)
    if counts is not None:
        left = float_reasons_table(counts.left_in_float, title="ops left in float")
        for (op, reason), count in counts.never_quantized.most_common():
            left.add_row(op, str(count), reason, "")
        parts.append(left)
    for record in records:
        if isinstance(record.details, Explained):
            parts.extend(record.details.explanation(record.name))
    return _spaced(parts) if parts else Text("no pass reports rules")


def records_report(records: Iterable[PassRecord]) -> Table:
    table = _table("phase", "pass", "seconds", "changed", "before", "after", title="passes")
    for r in records:
        table.add_row(
            r.phase.value,
            r.name,
            f"{r.seconds:.3f}",
            "yes" if r.modified else "-",
            str(r.nodes_before),
            str(r.nodes_after),
        )
    return table


def check_report(
    source: str, target: TargetSpec, rules: Sequence[str], violations: Sequence[Violation]
) -> RenderableType:
    """What ``qgraph check`` prints: the verdict, and a row per violation."""
    if not violations:
        return Text(
            f"{printable(source)} conforms to target {target.name} ({len(rules)} rules checked)"
        )
    title = f"{source} breaks target {target.name}: {len(violations)} violation(s)"
    table = _table("rule", "node", "what is wrong", title=title)
    for column in table.columns:
        column.overflow = "fold"  # names in full, never cut short
    for violation in violations:
        table.add_row(violation.rule, violation.node or "-", violation.message)
    return table


def targets_report(
    targets: Iterable[TargetSpec], host: TargetSpec | None, race: KernelRace | None = None
) -> RenderableType:
    """What ``qgraph targets`` prints: each record, the one ``auto`` picks here marked, and
    the kernel race that picked it where there was one."""
    parts: list[RenderableType] = []
    for target in targets:
        title = target.name + ("  (auto on this host)" if host is target else "")
        table = _table("", "", title=title)
        for key, value in target.describe().items():
            if key != "name":
                table.add_row(key, _plain(value))
        parts.append(table)
    if race is not None and host is not None:
        parts.append(Text(f"auto picked {host.name} by the kernel race here: {race.describe()}"))
    return _spaced(parts)


PERCENT_FIGURES = ("agreement",)


def _figure(name: str, value: float) -> str:
    if any(word in name for word in PERCENT_FIGURES):
        return f"{100 * value:.2f} %"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def evaluation_report(evaluation: Evaluation, reference: str, candidate: str) -> RenderableType:
    """What ``qgraph eval`` prints."""
    heading = f"{evaluation.metric}: {candidate} against {reference} ({evaluation.batches} batches)"
    accuracy = _table("", "")
    for name, value in evaluation.figures.items():
        accuracy.add_row(name, _figure(name, value))
    cost = _table("", "reference", "candidate", "ratio", title="cost")
    cost.add_row(
        "size",
        format_bytes(evaluation.reference_bytes),
        format_bytes(evaluation.candidate_bytes),
        f"{evaluation.size_ratio:.3f}",
    )
    for latency in evaluation.latencies:
        cost.add_row(
            f"latency (median of {latency.runs}, {thread_words(latency.threads)})",
            f"{1e3 * latency.reference:.3f} ms",
            f"{1e3 * latency.candidate:.3f} ms",
            f"{latency.speedup:.2f}x faster"
            if latency.speedup >= 1
            else f"{1 / latency.speedup:.2f}x slower",
        )
    return _spaced([Text(heading, style="bold"), accuracy, cost])


def debug_report(report: DebugReport, *, top: int | None) -> RenderableType:
    """What ``qgraph debug`` prints: the quantized ops, worst first (``OpError.rank_key``)."""
    shown = report.ops if top is None else report.ops[:top]
    heading = f"{len(report.ops)} quantized ops over {report.batches} batches, worst first" + (
        f" (the {len(shown)} worst shown)" if len(shown) < len(report.ops) else ""
    )
    table = _table(
        "rank", "node", "op", "module", "alone at output", "local", "cumulative", title="SQNR (dB)"
    )
    for rank, op in enumerate(shown, start=1):
        table.add_row(
            str(rank),
            op.node,
            op.op_type,
            op.module or "-",
            "-" if op.output_sqnr_db is None else f"{op.output_sqnr_db:.1f}",
            f"{op.local_sqnr_db:.1f}",
            f"{op.cumulative_sqnr_db:.1f}",
        )
    outputs = _table("model output", "SQNR (dB)")
    for name, value in report.outputs.items():
        outputs.add_row(name, f"{value:.1f}")
    parts: list[RenderableType] = [Text(heading, style="bold"), table, outputs]
    parts.append(
        "alone at output: the model outputs of the float model with only this op's error added "
        "(the ranking, when measured); local: the op's output, fed the float model's own "
        "inputs; cumulative: the op's output as the quantized model runs"
    )
    if report.unmatched:
        parts.append(
            f"{len(report.unmatched)} quantized ops have no float counterpart by name: "
            + ", ".join(report.unmatched[:5])
        )
    return _spaced(parts)


def diff_report(diff: ModelDiff, before: str, after: str) -> RenderableType:
    """What ``qgraph inspect A --diff B`` prints: the counts a reviewer checks first, then
    the op, pass, spec and dtype tables."""
    old, new = diff.before, diff.after
    headline = _table("", "", title=f"{before} -> {after}")
    headline.add_row("nodes", f"{old.nodes} -> {new.nodes} ({new.nodes - old.nodes:+d})")
    for op, quantized in new.quantized_ops.items():
        headline.add_row(f"{op} quantized", f"{quantized} of {new.op_histogram.get(op, 0)}")
    headline.add_row(
        "Q/DQ inserted",
        f"{new.quantize_nodes - old.quantize_nodes:+d} QuantizeLinear, "
        f"{new.dequantize_nodes - old.dequantize_nodes:+d} DequantizeLinear",
    )
    for pass_name, created in diff.created_by_pass.items():
        made = ", ".join(f"{op} x{count}" for op, count in created.items())
        headline.add_row(f"made by {pass_name}", made)
    headline.add_row(
        "size",
        f"{format_bytes(old.parameter_bytes)} -> {format_bytes(new.parameter_bytes)} "
        f"({diff.size_ratio:.2f}x)",
    )
    ops = _table("op", "before", "after", "change", title="ops whose count changed")
    for change in diff.ops:
        ops.add_row(
            change.op, str(change.before), str(change.after), f"{change.after - change.before:+d}"
        )
    specs = _table("kind", "spec", "tensors", title="quantized tensors")
    for (kind, spec), count in diff.quantized_tensors.items():
        specs.add_row(kind, spec, str(count))
    dtypes = _table("dtype", "before", "after", title="parameters by dtype")
    old_bytes = {p.dtype: p.bytes for p in old.parameters}
    new_bytes = {p.dtype: p.bytes for p in new.parameters}
    for dtype in sorted(set(old_bytes) | set(new_bytes)):
        dtypes.add_row(
            dtype, format_bytes(old_bytes.get(dtype, 0)), format_bytes(new_bytes.get(dtype, 0))
        )
    return _spaced([headline, ops, specs, dtypes])


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def passes_report(passes: Iterable[PassInfo]) -> Table:
    table = _table("phase", "pass", "origin", "what it does", "why", title="registered passes")
    for info in passes:
        table.add_row(info.phase.value, info.name, info.origin, info.summary, info.why or "-")
    return table


def _spaced(parts: Sequence[RenderableType]) -> Group:
    spaced: list[RenderableType] = []
    for part in parts:
        if spaced:
            spaced.append("")
        spaced.append(part)
    return Group(*spaced)
