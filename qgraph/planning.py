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
3. Each op's speed value ``v_i`` is what 8 bits save on it, measured on this host at its own
   shapes (``qgraph.timing``: the op alone in float and as qgraph quantizes it, timed in
   onnxruntime, cached). An op that int8 makes slower stays float whatever the budget.
   Keeping in float the ops of largest ``e_i / v_i`` first spends the least speed per unit of
   error removed (the greedy answer to this knapsack).
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
from qgraph.targets import TargetSpec
from qgraph.timing import TIMED_OPS, default_cache, op_shape
from qgraph.verify import expose_values, run, session

logger = logging.getLogger(__name__)

PLAN_BATCHES = 2
"""The plan measures the output SQNR on the first calibration batches (on MiniLM, 8 rows of
them measured 19 dB where 64 measured 24, and the held-out set 24)."""
IMPACT_ROWS = 2
"""Each op's error alone at the outputs, one float run per op, is measured on the first rows
of the first batch only: on SmolLM2 (271 candidates) 8 rows of 128 tokens took 20 minutes."""
MAX_ROUNDS = 9
"""Compiles in all, the all-8-bit one included."""

Compile = Callable[[dict[str, str]], ir.Model]
"""Compiles the model with the given ops (node name -> reason) kept in float."""


@dataclasses.dataclass(frozen=True)
class OpCost:
    """What quantizing one op costs at the outputs and what it gains in speed."""

    node: str
    op_type: str
    alone_sqnr_db: float
    """The output SQNR with only this op quantized."""
    gain_seconds: float
    """What 8 bits save on it per run of the first calibration batch, measured; negative
    where int8 is slower."""


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What the plan measured, what it kept in float, and where it landed."""

    budget_db: float
    all_quantized_db: float
    final_db: float
    kept_float: tuple[OpCost, ...]
    gain_share: float
    """The share of the measured int8 gain of all faster candidates that the model keeps."""
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
            f"({1 - self.gain_share:.0%} of the measured int8 gain) give "
            f"{self.final_db:.1f} dB ({self.rounds} rounds, {self.seconds:.0f} s)"
        )


def plan_batches(data: DataSource) -> list[Feeds]:
    """The plan's sample: the first ``PLAN_BATCHES`` batches of ``data``."""
    return list(itertools.islice(read_batches(data), PLAN_BATCHES))


def _dynamic_batch(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) > 0 and not isinstance(shape[0], int)


def reference_outputs(float_model: ir.Model, batches: list[Feeds]) -> list[dict]:
    """The float model's outputs on each batch, computed once for every round's measure."""
    reference = session(float_model, optimize=True, threads=0)
    return [run(reference, feeds) for feeds in batches]


def output_sqnr_db(expected: list[dict], candidate: ir.Model, batches: list[Feeds]) -> float:
    """The SQNR of ``candidate``'s outputs against the ``expected`` ones (the float model's,
    ``reference_outputs``), all outputs together."""
    compiled = session(candidate, optimize=True, threads=0)
    signal = noise = 0.0
    for feeds, reference in zip(batches, expected, strict=True):
        actual = run(compiled, feeds)
        for name, y in reference.items():
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
    target: TargetSpec,
    progress: Callable[[str], None] = lambda step: None,
) -> tuple[ir.Model, PlanReport]:
    """The compiled model meeting ``budget_db`` with the fewest ops kept in float; ops that
    int8 makes slower here are kept in float whatever the budget."""
    start = time.perf_counter()
    batches = plan_batches(data)
    expected = reference_outputs(float_model, batches)
    progress("plan: every candidate in 8 bits")
    candidate = compile_with({})
    measured = output_sqnr_db(expected, candidate, batches)
    progress("plan: timing each op in float and in 8 bits")
    gains = _gains(candidate, batches[0], target)
    types = {node.name: node.op_type for node in candidate.graph}
    slow = [OpCost(n, types[n], math.inf, g) for n, g in gains.items() if g <= 0]
    if measured >= budget_db:
        if slow:
            candidate = compile_with(_reasons(slow, budget_db))
        final = measured if not slow else output_sqnr_db(expected, candidate, batches)
        report = _report(budget_db, measured, final, tuple(slow), gains, 1 + bool(slow), start)
        return candidate, report
    progress("plan: measuring each op's error alone at the outputs")
    impacts = _impacts(float_model, candidate, batches)
    slow = [dataclasses.replace(op, alone_sqnr_db=impacts.get(op.node, math.inf)) for op in slow]
    costs = [
        OpCost(node, types[node], impacts[node], gain)
        for node, gain in gains.items()
        if gain > 0 and node in impacts
    ]
    order = slow + sorted(costs, key=_error_per_gain, reverse=True)
    needed = _noise(measured) - _noise(budget_db)
    count = max(_ops_covering(order, _noise(measured), needed), len(slow))
    passing: tuple[int, ir.Model, float] | None = None
    failing, rounds = len(slow) - 1 if slow else 0, 1
    while rounds < MAX_ROUNDS and (passing is None or passing[0] - failing > 1):
        rounds += 1
        progress(f"plan: round {rounds}, {count} ops kept in float")
        candidate = compile_with(_reasons(order[:count], budget_db))
        final = output_sqnr_db(expected, candidate, batches)
        logger.info("plan round %d: %d ops float, %.2f dB", rounds, count, final)
        if final >= budget_db:
            passing = (count, candidate, final)
        elif count == len(order):
            raise _unreachable(budget_db, final)
        else:
            failing = count
        count = _next_count(failing, passing[0] if passing else None, len(order))
    if passing is None:
        candidate = compile_with(_reasons(order, budget_db))
        final = output_sqnr_db(expected, candidate, batches)
        if final < budget_db:
            raise _unreachable(budget_db, final)
        passing = (len(order), candidate, final)
    count, candidate, final = passing
    return candidate, _report(
        budget_db, measured, final, tuple(order[:count]), gains, rounds, start
    )


def _report(
    budget_db: float,
    measured: float,
    final: float,
    kept: tuple[OpCost, ...],
    gains: dict[str, float],
    rounds: int,
    start: float,
) -> PlanReport:
    faster = sum(g for g in gains.values() if g > 0) or 1.0
    lost = sum(op.gain_seconds for op in kept if op.gain_seconds > 0)
    seconds = time.perf_counter() - start
    return PlanReport(budget_db, measured, final, kept, 1 - lost / faster, rounds, seconds)


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
    if op.gain_seconds <= 0:
        return (
            "kept in float by the accuracy plan: in 8 bits it ran slower here "
            f"({-op.gain_seconds * 1e3:.3f} ms more, measured)"
        )
    return (
        f"kept in float by the accuracy plan: alone in 8 bits it takes the outputs to "
        f"{op.alone_sqnr_db:.1f} dB (budget {budget_db:g} dB)"
    )


def _noise(sqnr_db: float) -> float:
    """Noise energy per unit of signal at ``sqnr_db``."""
    return 10 ** (-sqnr_db / 10)


def _error_per_gain(op: OpCost) -> float:
    return _noise(op.alone_sqnr_db) / op.gain_seconds


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


def _impacts(float_model: ir.Model, candidate: ir.Model, batches: list[Feeds]) -> dict[str, float]:
    """Node name -> the output SQNR with only that op quantized, on the impact sample."""
    sample = [{name: array[:IMPACT_ROWS] for name, array in batches[0].items()}]
    if not all(_dynamic_batch(value) for value in float_model.graph.inputs):
        sample = batches[:1]
    report = debug_accuracy(float_model, candidate, sample, impact_batches=1)
    return {op.node: _alone(op) for op in report.ops}


def _alone(op: OpError) -> float:
    return op.output_sqnr_db if op.output_sqnr_db is not None else op.local_sqnr_db


def _gains(candidate: ir.Model, feeds: Feeds, target: TargetSpec) -> dict[str, float]:
    """Node name -> seconds int8 saves on ``feeds``, measured (``qgraph.timing``), for each
    quantized op of ``candidate`` (``is_qdq_group``: the plan's candidates, not the float
    ops reading a dequantized value)."""
    ops = [node for node in candidate.graph if is_qdq_group(node) and node.op_type in TIMED_OPS]
    probe = ir.from_proto(ir.to_proto(candidate))  # its float values have the float shapes
    sources = {v.name: _float_source(v).name for n in ops for v in n.inputs[:2] if v is not None}
    expose_values(probe, set(sources.values()))
    shapes = {name: np.shape(array) for name, array in feeds.items()}
    shapes |= {name: np.shape(a) for name, a in run(probe, feeds, optimize=True).items()}
    cache = default_cache()
    gains = {}
    for node in ops:
        if sources[node.inputs[0].name] not in shapes:
            continue
        read = {
            v.name: shapes[sources[v.name]]
            for v in node.inputs[:2]
            if v is not None and sources[v.name] in shapes
        }
        float_seconds, int8_seconds = cache.seconds(op_shape(node, read, target), target)
        gains[node.name] = float_seconds - int8_seconds
    return gains


def _float_source(value: ir.Value) -> ir.Value:
    """The float tensor behind ``value``, through its DequantizeLinear and QuantizeLinear."""
    while (producer := value.producer()) is not None and producer.op_type in (
        "DequantizeLinear",
        "QuantizeLinear",
    ):
        value = producer.inputs[0]
    return value
