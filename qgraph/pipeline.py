"""The pass pipeline: onnx_ir passes grouped in named phases, run in order, each one timed.

A pass is registered as a ``PassInfo``: its name, its ``Phase``, what it does, why it is in the
pipeline, and the facts about the model it requires and ensures. qgraph's own passes are one
table, ``qgraph.passes.PIPELINE``, with the ordering constraints between them
(``qgraph.passes.ORDER``, ``Before`` records). ``Pipeline.add`` refuses a pass placed where it
would break a constraint or run before a pass that ensures what it requires: a plugin's pass
cannot land, unnoticed, before what it depends on.

Every node a pass creates is stamped with the pass's name in its metadata (``qgraph.pass``),
so inspection and debugging can say which pass made what.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import onnx_ir as ir

from qgraph.errors import PipelineError, QGraphError, one_line
from qgraph.graph.traversal import all_nodes

if TYPE_CHECKING:
    from qgraph.registry import PassContext

logger = logging.getLogger(__name__)

PROVENANCE_KEY = "qgraph.pass"
"""Node metadata key naming the pass that created the node."""

_SEEN_KEY = "qgraph.seen"
"""In-memory ``node.meta`` mark of nodes that existed before the current pass."""


class Phase(str, enum.Enum):
    """The named phases of a pipeline, in the order they run."""

    CANONICALIZE = "canonicalize"
    FLOAT_REWRITES = "float-rewrites"
    ANNOTATE = "annotate"
    INSERT_QDQ = "insert-qdq"
    LOWER = "lower"
    FINALIZE = "finalize"

    @classmethod
    def parse(cls, name: str | Phase) -> Phase:
        """The phase called ``name``; a ``PipelineError`` listing the phases otherwise."""
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise PipelineError(f"unknown phase '{name}'; phases are: {known}") from None


PassBuilder = Callable[["PassContext"], "ir.passes.PassBase | None"]
"""Makes a pass for a target and options, or returns None where the pass does not apply."""


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A registered pass: how to build it, where it runs, and why.

    ``build`` is a ``PassBuilder``, or for qgraph's own passes the name of the module under
    ``qgraph.passes`` whose ``BUILDERS[name]`` makes it (imported when the registry reads the
    table). ``requires`` and ``ensures``
    name facts about the model (``qgraph.passes.Fact`` for qgraph's): a pass that requires a
    fact runs after every pass that ensures it.
    """

    name: str
    phase: Phase
    summary: str
    build: PassBuilder | str
    origin: str = "qgraph"
    why: str = ""
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Before:
    """An ordering constraint: wherever both are in a pipeline, ``first`` runs before ``then``."""

    first: str
    then: str
    why: str


@dataclasses.dataclass
class ReportingPassResult(ir.passes.PassResult):
    """A pass result that also says what the pass did (kept as ``PassRecord.details``)."""

    details: object = None


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did in one run; ``details`` is what a reporting pass returned."""

    phase: Phase
    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    details: object = None


@dataclasses.dataclass
class PipelineResult:
    """The rewritten model and a record per pass."""

    model: ir.Model
    records: list[PassRecord]

    @property
    def modified(self) -> bool:
        return any(record.modified for record in self.records)


PassListener = Callable[[Phase, str], None]
"""Called with (phase, pass name) just before each pass runs."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    phase: Phase
    name: str
    pass_: ir.passes.PassBase
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()


class Pipeline:
    """Passes in named phases, kept in an order that breaks none of ``order``'s constraints.
    Build one for a target with ``qgraph.build_pipeline``."""

    def __init__(self, order: Iterable[Before] = ()) -> None:
        self._entries: list[_Entry] = []
        self._order = tuple(order)

    def add(
        self,
        pass_: ir.passes.PassBase,
        phase: Phase | str,
        *,
        name: str | None = None,
        first: bool = False,
        requires: Iterable[str] = (),
        ensures: Iterable[str] = (),
    ) -> Pipeline:
        """Add ``pass_`` at the end (or, with ``first``, the start) of ``phase``; a
        ``PipelineError`` if it would run before a pass it must follow, or after one it must
        precede (an ordering constraint, or a fact it ``requires`` that the other ``ensures``)."""
        if not isinstance(pass_, ir.passes.PassBase):
            raise PipelineError(
                f"{pass_!r} is not an onnx_ir pass (subclass ir.passes.InPlacePass "
                "or FunctionalPass)"
            )
        entry = _Entry(
            Phase.parse(phase),
            name or type(pass_).__name__,
            pass_,
            frozenset(requires),
            frozenset(ensures),
        )
        if entry.name in self.names():
            raise PipelineError(f"the pipeline already has a pass named '{entry.name}'")
        position = self._position(entry.phase, first=first)
        problem = self._order_problem(entry, position)
        if problem is not None:
            raise PipelineError(f"cannot add pass '{entry.name}' to {entry.phase.value}: {problem}")
        self._entries.insert(position, entry)
        return self

    def _position(self, phase: Phase, *, first: bool) -> int:
        """Where a pass added to ``phase`` goes: after its phase's passes, or with ``first``
        before them."""
        order = list(Phase)
        for i, existing in enumerate(self._entries):
            later = order.index(existing.phase) > order.index(phase)
            if later or (first and existing.phase == phase):
                return i
        return len(self._entries)

    def _order_problem(self, entry: _Entry, position: int) -> str | None:
        """Why ``entry`` cannot go at ``position``, or None where it can."""
        earlier, later = self._entries[:position], self._entries[position:]
        for rule in self._order:
            if rule.first == entry.name and any(e.name == rule.then for e in earlier):
                return f"it must run before '{rule.then}' ({rule.why})"
            if rule.then == entry.name and any(e.name == rule.first for e in later):
                return f"it must run after '{rule.first}' ({rule.why})"
        for fact in sorted(entry.requires):
            maker = next((e for e in later if fact in e.ensures), None)
            if maker is not None:
                return f"it requires '{fact_name(fact)}' and would run before '{maker.name}'"
        for fact in sorted(entry.ensures):
            reader = next((e for e in earlier if fact in e.requires), None)
            if reader is not None:
                return f"it ensures '{fact_name(fact)}' and would run after '{reader.name}'"
        return None

    def remove(self, name: str) -> Pipeline:
        """Drop the pass called ``name``."""
        if name not in self.names():
            raise PipelineError(f"the pipeline has no pass named '{name}'")
        self._entries = [e for e in self._entries if e.name != name]
        return self

    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def passes(self) -> Iterator[tuple[Phase, str, ir.passes.PassBase]]:
        """(phase, name, pass) in run order."""
        for entry in self._entries:
            yield entry.phase, entry.name, entry.pass_

    def run(self, model: ir.Model, *, listener: PassListener | None = None) -> PipelineResult:
        """Run every pass in order on ``model`` (rewritten in place by in-place passes)."""
        records = []
        nodes = _stamp_new_nodes(model, None)
        for entry in self._entries:
            if listener is not None:
                listener(entry.phase, entry.name)
            start = time.perf_counter()
            result = _run_one(entry, model)
            seconds = time.perf_counter() - start
            model = result.model
            nodes_after = _stamp_new_nodes(model, entry.name)
            details = getattr(result, "details", None)
            records.append(
                PassRecord(
                    entry.phase, entry.name, seconds, result.modified, nodes, nodes_after, details
                )
            )
            logger.info(
                "%s/%s: %.3fs, %s, %d -> %d nodes",
                entry.phase.value,
                entry.name,
                seconds,
                "modified" if result.modified else "unchanged",
                nodes,
                nodes_after,
            )
            nodes = nodes_after
        return PipelineResult(model, records)


def fact_name(fact: str) -> str:
    """A fact's name: an enum member's value, or the string itself."""
    return getattr(fact, "value", fact)


def _run_one(entry: _Entry, model: ir.Model) -> ir.passes.PassResult:
    try:
        return entry.pass_(model)
    except QGraphError:
        raise
    except Exception as error:
        invariant = isinstance(error, ir.passes.InvariantError) and error.__cause__ is not None
        cause = error.__cause__ if invariant else error
        raise PipelineError(
            f"pass '{entry.name}' ({entry.phase.value}) failed: "
            + one_line(f"{type(cause).__name__}: {cause}")
        ) from error


def _stamp_new_nodes(model: ir.Model, pass_name: str | None) -> int:
    """Record ``pass_name`` on nodes not seen before (None: only mark); return the node count."""
    count = 0
    for node in all_nodes(model.graph):
        count += 1
        if _SEEN_KEY not in node.meta:
            node.meta[_SEEN_KEY] = True
            if pass_name is not None:
                node.metadata_props.setdefault(PROVENANCE_KEY, pass_name)
    return count
