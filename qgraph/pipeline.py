"""The pass pipeline: onnx_ir passes grouped in named phases, run in order, each one timed.

Phases, in order:

1. ``canonicalize``: shape inference, constant folding, identity and dead-code removal, CSE.
2. ``float-rewrites``: rewrites that keep the float function (fusion, SmoothQuant, rotation).
3. ``annotate``: a quantization spec per tensor, from the target and user overrides.
4. ``insert-qdq``: QuantizeLinear / DequantizeLinear pairs from calibration and specs.
5. ``lower``: the target's lowering rules (Q/DQ groups to QOperator ops).
6. ``finalize``: unused removal, topological order, names, ONNX checker, target conformance.

Every node a pass creates is stamped with the pass's name in its metadata (``qgraph.pass``),
so inspection and debugging can say which pass made what.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterator

import onnx_ir as ir

from qgraph.errors import PipelineError, QGraphError, one_line
from qgraph.traversal import all_nodes

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


class Pipeline:
    """Passes in named phases. Build one for a target with ``qgraph.build_pipeline``."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def add(
        self,
        pass_: ir.passes.PassBase,
        phase: Phase | str,
        *,
        name: str | None = None,
        first: bool = False,
    ) -> Pipeline:
        """Add ``pass_`` at the end (or, with ``first``, the start) of ``phase``."""
        if not isinstance(pass_, ir.passes.PassBase):
            raise PipelineError(
                f"{pass_!r} is not an onnx_ir pass (subclass ir.passes.InPlacePass "
                "or FunctionalPass)"
            )
        entry = _Entry(Phase.parse(phase), name or type(pass_).__name__, pass_)
        if entry.name in self.names():
            raise PipelineError(f"the pipeline already has a pass named '{entry.name}'")
        order = list(Phase)
        position = len(self._entries)
        for i, existing in enumerate(self._entries):
            before = order.index(existing.phase) > order.index(entry.phase)
            if before or (first and existing.phase == entry.phase):
                position = i
                break
        self._entries.insert(position, entry)
        return self

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


def _run_one(entry: _Entry, model: ir.Model) -> ir.passes.PassResult:
    try:
        return entry.pass_(model)
    except QGraphError:
        raise
    except Exception as error:
        cause = error.__cause__ if isinstance(error, ir.passes.InvariantError) else error
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
