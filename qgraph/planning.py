"""The accuracy budget: quantize all the target runs faster in 8 bits, then keep in float the
fewest ops, by speed lost per accuracy bought, that the budget needs.

Accuracy is the output SQNR of the compiled model against the float model, all outputs
together, on the plan's batches (the first ``PLAN_BATCHES`` calibration batches):

    SQNR = 10 log10(S / N),    S = sum y^2,    N = sum (y - y')^2

1. Compile with every candidate op quantized. If its SQNR meets the budget ``B``, that is the
   model.
2. Measure each quantized op's error alone at the outputs (``qgraph.debugging``, on the first
   ``IMPACT_ROWS`` rows of the first batch): the float
   model with only that op's quantization error added, ``e_i`` its error energy there.
   Errors of different ops are close to uncorrelated, so keeping a set ``F`` in float leaves
   about ``N - sum_{i in F} e_i``, and the budget asks for ``N_F <= S 10^(-B / 10)``.
3. Each op's speed value ``v_i`` is the work int8 takes off it: its multiply-accumulates on
   the plan batch (output elements times reduction length), times the same int8 gain for
   every op (the cost model; measured per-op timings are an open issue). Keeping in float the
   ops of largest ``e_i / v_i`` first spends the least speed per unit of error removed (the
   greedy answer to this knapsack).
4. Errors compound along the network, so alone they add up to less than the measured ``N``:
   they are scaled to add up to it, and ``F`` is the shortest prefix of that order removing
   ``N - S 10^(-B / 10)``. Compile with ``F`` kept in float and measure; while the measure
   misses the budget, double ``F``; once one passes, bisect between the longest failing and
   the shortest passing prefix, in all at most ``MAX_ROUNDS`` compiles. If none passed, every
   candidate stays float, which meets any budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qgraph.data import DataSource, Feeds, read_batches
from qgraph.debugging import OpError, debug_accuracy, energy_of
from qgraph.errors import QGraphError
from qgraph.kernels import is_qdq_group
from qgraph.verify import expose_values, run, session

logger = logging.getLogger(__name__)

PLAN_BATCHES = 2
"""The plan measures the output SQNR on the first calibration batches (on MiniLM, 8 rows of
them measured 19 dB where 64 measured 24, and the held-out set 24)."""
IMPACT_ROWS = 2
"""Each op's error alone at the outputs, one float run per op, is measured on the first rows
of the first batch only: on SmolLM2 (271 candidates) 8 rows of 128 tokens took 20 minutes."""
MAX_ROUNDS = 6
"""Compiles in all, the all-8-bit one included."""

Compile = Callable[[dict[str, str]], ir.Model]
"""Compiles the model with the given ops (node name -> reason) kept in float."""


@dataclasses.dataclass(frozen=True)
class OpCost:
    """What quantizing one op costs at the outputs and what it is worth in speed."""

    node: str
    op_type: str
    alone_sqnr_db: float
    """The output SQNR with only this op quantized."""
    macs: int
    """Its multiply-accumulates on the plan batch (the speed it gains in 8 bits)."""


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What the plan measured, what it kept in float, and where it landed."""

    budget_db: float
    all_quantized_db: float
    final_db: float
    kept_float: tuple[OpCost, ...]
    quantized_macs_share: float
    """The share of the candidate ops' multiply-accumulates left in 8 bits."""
    rounds: int
    seconds: float

    def kept_reasons(self) -> dict[str, str]:
        """Node name -> why the plan keeps it in float."""
        return {op.node: _reason(op, self.budget_db) for op in self.kept_float}

    def summary(self) -> str:
        if not self.kept_float:
            return (
                f"accuracy budget {self.budget_db:g} dB met with every candidate in 8 bits "
                f"(output SQNR {self.all_quantized_db:.1f} dB on the calibration sample)"
            )
        return (
            f"accuracy budget {self.budget_db:g} dB: all in 8 bits gave "
            f"{self.all_quantized_db:.1f} dB; {len(self.kept_float)} ops kept in float "
            f"({1 - self.quantized_macs_share:.0%} of the quantizable work) give "
            f"{self.final_db:.1f} dB ({self.rounds} rounds, {self.seconds:.0f} s)"
        )


def plan_batches(data: DataSource) -> list[Feeds]:
    """The plan's sample: the first ``PLAN_BATCHES`` batches of ``data``."""
    return list(itertools.islice(read_batches(data), PLAN_BATCHES))


def _dynamic_batch(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) > 0 and not isinstance(shape[0], int)


def output_sqnr_db(float_model: ir.Model, candidate: ir.Model, batches: list[Feeds]) -> float:
    """The SQNR of ``candidate``'s outputs against ``float_model``'s, all outputs together."""
    reference, compiled = (
        session(float_model, optimize=True, threads=0),
        session(candidate, optimize=True, threads=0),
    )
    signal = noise = 0.0
    for feeds in batches:
        expected, actual = run(reference, feeds), run(compiled, feeds)
        for name, y in expected.items():
            if not np.issubdtype(np.asarray(y).dtype, np.floating):
                continue
            finite = np.isfinite(y)  # where the float model itself gives NaN, nothing to keep
            signal += energy_of(np.asarray(y)[finite])
            noise += energy_of(np.asarray(y, np.float64)[finite] - np.asarray(actual[name])[finite])
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def plan(
    float_model: ir.Model,
    compile_with: Compile,
    data: DataSource,
    budget_db: float,
    progress: Callable[[str], None] = lambda step: None,
) -> tuple[ir.Model, PlanReport]:
    """The compiled model meeting ``budget_db`` with the fewest ops kept in float."""
    start = time.perf_counter()
    batches = plan_batches(data)
    progress("plan: every candidate in 8 bits")
    candidate = compile_with({})
    measured = output_sqnr_db(float_model, candidate, batches)
    if measured >= budget_db:
        report = PlanReport(budget_db, measured, measured, (), 1.0, 1, time.perf_counter() - start)
        return candidate, report
    progress("plan: measuring each op's error alone at the outputs")
    costs = _op_costs(float_model, candidate, batches)
    order = sorted(costs, key=_error_per_work, reverse=True)
    count = _ops_covering(order, _noise(measured), _noise(measured) - _noise(budget_db))
    passing: tuple[int, ir.Model, float] | None = None
    failing, rounds = 0, 1
    while rounds < MAX_ROUNDS and (passing is None or passing[0] - failing > 1):
        rounds += 1
        progress(f"plan: round {rounds}, {count} ops kept in float")
        candidate = compile_with(_reasons(order[:count], budget_db))
        final = output_sqnr_db(float_model, candidate, batches)
        logger.info("plan round %d: %d ops float, %.2f dB", rounds, count, final)
        if final >= budget_db:
            passing = (count, candidate, final)
        elif count == len(order):
            raise _unreachable(budget_db, final)
        else:
            failing = count
        count = _next_count(failing, passing[0] if passing else None, len(order))
    if passing is None:
        count = len(order)
        candidate = compile_with(_reasons(order, budget_db))
        final = output_sqnr_db(float_model, candidate, batches)
        if final < budget_db:
            raise _unreachable(budget_db, final)
        passing = (count, candidate, final)
    count, candidate, final = passing
    kept = tuple(order[:count])
    total = sum(op.macs for op in costs) or 1
    share = 1 - sum(op.macs for op in kept) / total
    report = PlanReport(
        budget_db, measured, final, kept, share, rounds, time.perf_counter() - start
    )
    return candidate, report


class BudgetError(QGraphError):
    """The accuracy budget cannot be met."""


def _unreachable(budget_db: float, float_db: float) -> BudgetError:
    return BudgetError(
        f"the accuracy budget of {budget_db:g} dB cannot be met: with every candidate op in "
        f"float the outputs are at {float_db:.1f} dB of the float model (what stays quantized, "
        "embedding tables, sets that); lower --budget, or --budget none"
    )


def _next_count(failing: int, passing: int | None, total: int) -> int:
    """The next number of ops to keep in float: double the failing count until one passes,
    then bisect between the largest failing and the smallest passing count."""
    if passing is None:
        return min(total, max(2 * failing, failing + 1))
    return (failing + passing) // 2


def _reasons(ops: tuple[OpCost, ...] | list[OpCost], budget_db: float) -> dict[str, str]:
    return {op.node: _reason(op, budget_db) for op in ops}


def _reason(op: OpCost, budget_db: float) -> str:
    return (
        f"kept in float by the accuracy plan: alone in 8 bits it takes the outputs to "
        f"{op.alone_sqnr_db:.1f} dB (budget {budget_db:g} dB)"
    )


def _noise(sqnr_db: float) -> float:
    """Noise energy per unit of signal at ``sqnr_db``."""
    return 10 ** (-sqnr_db / 10)


def _error_per_work(op: OpCost) -> float:
    return _noise(op.alone_sqnr_db) / max(op.macs, 1)


def _ops_covering(order: list[OpCost], total: float, needed: float) -> int:
    """How many ops of ``order``, kept in float, remove ``needed`` of the ``total`` noise (per
    unit signal). The ops' errors alone are scaled to add up to the measured total: errors
    compound along the network, so alone they add up to less than all together."""
    alone = sum(_noise(op.alone_sqnr_db) for op in order)
    scale = total / alone if alone > 0 else 1.0
    removed = 0.0
    for count, op in enumerate(order, start=1):
        removed += scale * _noise(op.alone_sqnr_db)
        if removed >= needed:
            return count
    return len(order)


def _op_costs(float_model: ir.Model, candidate: ir.Model, batches: list[Feeds]) -> list[OpCost]:
    sample = [{name: array[:IMPACT_ROWS] for name, array in batches[0].items()}]
    if not all(_dynamic_batch(value) for value in float_model.graph.inputs):
        sample = batches[:1]
    report = debug_accuracy(float_model, candidate, sample, impact_batches=1)
    macs = _macs(float_model, candidate, sample[0])
    return [_cost(op, macs[op.node]) for op in report.ops if op.node in macs]


def _cost(op: OpError, macs: int) -> OpCost:
    alone = op.output_sqnr_db if op.output_sqnr_db is not None else op.local_sqnr_db
    return OpCost(op.node, op.op_type, alone, macs)


def _macs(float_model: ir.Model, candidate: ir.Model, feeds: Feeds) -> dict[str, int]:
    """Node name -> multiply-accumulates on ``feeds``, for each quantized op of ``candidate``
    (``is_qdq_group``: the plan's candidates, not the float ops reading a dequantized value):
    output elements times the reduction length (weight elements per output channel, or the
    last axis of the first input for a product of two computed tensors)."""
    ops = [node for node in candidate.graph if is_qdq_group(node)]
    probe = ir.from_proto(ir.to_proto(float_model))
    computed = {value.name for node in probe.graph for value in node.outputs}
    names = [v.name for n in ops for v in (n.outputs[0], n.inputs[0]) if v.name in computed]
    expose_values(probe, names)
    shapes = {name: np.shape(array) for name, array in run(probe, feeds, optimize=True).items()}
    feeds_shapes = {name: np.shape(array) for name, array in feeds.items()}
    return {node.name: _node_macs(node, {**feeds_shapes, **shapes}) for node in ops}


def _node_macs(node: ir.Node, shapes: dict[str, tuple[int, ...]]) -> int:
    output = shapes.get(node.outputs[0].name)
    if output is None:
        return 0
    return int(np.prod(output)) * _reduction(node, shapes)


def _reduction(node: ir.Node, shapes: dict[str, tuple[int, ...]]) -> int:
    weight = _constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is not None:
        return max(int(np.prod(weight)) // max(_channels(node, weight), 1), 1)
    first = shapes.get(node.inputs[0].name)
    return int(first[-1]) if first else 1


def _channels(node: ir.Node, shape: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        return shape[0]
    transposed = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
    return shape[0] if transposed else shape[-1]


def _constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of the constant behind a dequantized weight (through a 2-D Transpose of a
    tied table), or None for a computed one."""
    transposes = 0
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in ("DequantizeLinear", "Transpose"):
            return None
        transposes += producer.op_type == "Transpose"
        value = producer.inputs[0]
    if value is None:
        return None
    shape = tuple(value.const_value.shape)
    return shape[::-1] if transposes % 2 else shape
