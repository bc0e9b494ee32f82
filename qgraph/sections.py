"""Report sections: what a pass's result says about what it did, for the compile report.

A pass result's ``details`` (``ReportingPassResult``) offers any of three sections, which
``qgraph.report`` reads in pipeline order without ever asking which pass made them:

- ``Summarized``: ``summary()``, one line under the compile's quantization table;
- ``Explained``: ``explanation(pass_name)``, the tables ``--explain`` prints;
- ``Counted``: ``outcome()``, a ``QuantizationOutcome``: the ops it quantized, put back in
  float, or left in float and why. The report adds them up over the passes.

The table helpers here (``table``, ``printable``) are the ones every report uses, so a pass's
section looks like the rest.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

MAX_EXAMPLES = 3
"""Node names shown per row of a grouped table."""

_UNPRINTABLE = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}
"""C0 and C1 control characters (escape sequences, newlines) and bidirectional overrides."""


BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural (an added s) unless it is one: "1 op", "3 ops"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_bytes(count: int) -> str:
    """``1536 -> '1.5 KB'`` (powers of 1024)."""
    value = float(count)
    for unit in BYTE_UNITS:
        if abs(value) < 1024 or unit == BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def printable(text: str) -> str:
    """``text`` with its control characters written out (``\\x1b``): a name read from a
    model can then neither drive the terminal nor forge a line of qgraph's output."""
    return text.translate(_UNPRINTABLE)


class _PrintableTable(Table):
    """A table whose text cells are ``printable``: they hold names read from models."""

    def add_row(self, *cells, **options) -> None:
        super().add_row(*(printable(c) if isinstance(c, str) else c for c in cells), **options)


_NUMERIC = frozenset(
    {
        "count",
        "tensors",
        "elements",
        "bytes",
        "seconds",
        "before",
        "after",
        "quantized",
        "left in float",
    }
)


def table(*columns: str, title: str | None = None) -> Table:
    """A borderless table; all-blank column names mean a key/value table without header."""
    made = _PrintableTable(
        title=title,
        title_justify="left",
        title_style="bold",
        box=None,
        pad_edge=False,
        show_header=any(columns),
    )
    for column in columns:
        made.add_column(column, justify="right" if column in _NUMERIC else "left")
    return made


@dataclasses.dataclass
class QuantizationOutcome:
    """What one pass did to the ops a compile may quantize."""

    quantized: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Ops quantized, by op type."""
    reverted: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Ops an earlier pass quantized and this one put back in float, by op type."""
    left_in_float: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Node name -> (op type, reason) for each candidate left in float."""
    never_quantized: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    """(op type, reason) -> how many ops that are no candidate (the target never quantizes
    them) stay in float."""


@runtime_checkable
class Summarized(Protocol):
    def summary(self) -> str:
        """One line saying what the pass did."""


@runtime_checkable
class Explained(Protocol):
    def explanation(self, pass_name: str) -> Sequence[RenderableType]:
        """Tables saying what the pass did where, and why not elsewhere."""


@runtime_checkable
class Counted(Protocol):
    def outcome(self) -> QuantizationOutcome:
        """What the pass did to the ops a compile may quantize."""


def float_reasons_table(reasons: dict[str, tuple[str, str]], title: str | None = None) -> Table:
    """Nodes left in float grouped by (op, reason), most common first, with examples."""
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for node, (op, reason) in reasons.items():
        groups[(op, reason)].append(node)
    made = table("op", "count", "why left in float", "e.g.", title=title)
    for (op, reason), nodes in sorted(groups.items(), key=lambda item: -len(item[1])):
        made.add_row(op, str(len(nodes)), reason, ", ".join(nodes[:MAX_EXAMPLES]))
    return made


def rule_tables(
    pass_name: str,
    applied: dict[str, int],
    near_misses: Iterable,
    activations: dict[str, int] | None = None,
) -> list[RenderableType]:
    """A rewrite-rule pass's explanation: matches per rule, then its near-misses by reason
    (``near_misses``: records with ``rule``, ``node`` and ``reason``)."""
    near_misses = list(near_misses)
    rules = table("rule", "applied", "near-misses", title=f"{pass_name}: rules")
    misses = collections.Counter(m.rule for m in near_misses)
    for name, count in applied.items():
        rules.add_row(name, str(count), str(misses.get(name, 0)))
    for activation, count in (activations or {}).items():
        rules.add_row(f"activation {activation}", str(count), "")
    return [rules, _near_miss_table(pass_name, near_misses)]


def _near_miss_table(pass_name: str, near_misses: list) -> RenderableType:
    if not near_misses:
        return Text(f"{pass_name}: no near-misses")
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for miss in near_misses:
        groups[(miss.rule, miss.reason)].append(miss.node)
    made = table("rule", "count", "why not", "where", title=f"{pass_name}: near-misses")
    for (rule, reason), nodes in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(nodes[:MAX_EXAMPLES]) + (" ..." if len(nodes) > MAX_EXAMPLES else "")
        made.add_row(rule, str(len(nodes)), reason, shown)
    return made
