"""The accuracy plan: quantize all that 8 bits do not slow down on the target, then keep in
float the fewest ops, by speed lost per accuracy bought, that the budget needs.

Accuracy is the budget's figure (``qgraph.budget``: output SQNR, top-1 agreement, mean cosine
or perplexity ratio) of the compiled model against the float model on the plan's batches
(every batch of ``--eval`` data, else the first calibration batches: ``plan_sample``). Each
op's own cost is measured as an output SQNR whatever the budget:

    SQNR = 10 log10(S / N),    S = sum y^2,    N = sum (y - y')^2

1. Each candidate's value ``v_i`` is what 8 bits save on it, measured on this host at
   its own shapes (``qgraph.timing``: the op alone in float and as qgraph quantizes it, timed
   in onnxruntime, cached), or with ``--no-measure`` estimated from its work
   (``timing.CostModel``). An op that int8 makes slower stays float whatever the budget. One
   whose 8-bit time is within ``SAME_SPEED`` of its float time (the timings' noise) is a
   candidate too, for its weights' size (4x smaller): ``v_i`` is at least ``SIZE_WORTH`` of
   the op's float time.
2. Compile with every other candidate quantized. If its SQNR meets the budget ``B``, that is
   the model.
3. Measure each quantized op's error alone at the outputs (``qgraph.analysis.debugging``, on
   the first ``IMPACT_ROWS`` rows of the first batch): the float model with only that op's
   quantization error added, ``e_i`` its error energy there. Errors of different ops are
   close to uncorrelated, so keeping a set ``F`` in float leaves about ``N - sum_{i in F}
   e_i``, and an SQNR budget ``B`` asks for ``N_F <= S 10^(-B / 10)`` (every budget's error
   grows with ``N``: ``qgraph.budget``). Keeping in float the ops of
   largest ``e_i / v_i`` first spends the least speed per unit of error removed (the greedy
   answer to this knapsack).
4. Errors compound along the network, so alone they add up to less than the measured ``N``,
   and the shortest prefix of that order meeting the budget is searched by compiling and
   measuring (``CountSearch``: a line through the measures so far predicts the next count,
   with a bisection step whenever the line keeps landing on one side), in all at most
   ``MAX_ROUNDS`` compiles. If none passed, every candidate stays float, which meets any
   budget the float model can.
5. The ops kept in float for accuracy then get 16-bit activations where the target runs them
   as two 8-bit digits (``passes/lowering/digits.py``) no slower than float here
   (``sixteen_bit_costs``), if the budget still holds (``compiler._sixteen_bit_trial``).
6. The ops still in float keep computing in float, but their weights are stored in 8 bits
   and expanded once, at load (``passes/stored_weights.py``: ``storable``), if the budget
   still holds: first all of them, else only those kept for speed, whose activations never
   cost the budget anything (``compiler._storage_trial``).
7. Where the gains were timed on this host, the chosen model and the float one are timed
   whole (``compiler._whole_model_check``): the ops' gains, each timed alone, can miss what
   the model pays where int8 and float ops meet. Where the chosen model runs more than
   ``SAME_SPEED`` slower, every op stays float, its weights stored in 8 bits as in 6.

Embedding tables are not candidates: 8 bits save their size and cost the dequantization of
the rows a run gathers. One stays float where that costs a larger share of the model's time
than the share of its size it saves (``table_costs``).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qgraph.analysis.debugging import OpError, debug_accuracy, energy_of
from qgraph.budget import SQNR, Budget
from qgraph.data import ArraySpec, DataSource, Feeds, read_batches
from qgraph.errors import QGraphError
from qgraph.evaluation import METRICS
from qgraph.kernels import is_qdq_group
from qgraph.passes.annotate import embedding_table
from qgraph.passes.stored_weights import STORED_OPS
from qgraph.sections import counted
from qgraph.stopwatch import SAME_SPEED
from qgraph.targets import TargetSpec
from qgraph.timing import TIMED_OPS, OpShape, Timer, default_cache, op_shape
from qgraph.verify import expose_values, run, session

logger = logging.getLogger(__name__)

PLAN_BATCHES = 2
"""Without ``--eval`` data, the plan measures its budget on the first calibration batches (on
MiniLM, 8 rows of them measured 19 dB where 64 measured 24, and the held-out set 24)..."""
PLAN_ROWS = 8
"""... and on at least this many rows (a batch's first dimension): with one request a batch,
two batches would judge a top-1 budget on two samples."""
PLAN_MAX_BATCHES = 32
IMPACT_ROWS = 2
"""Each op's error alone at the outputs, one float run per op, is measured on the first rows
of the first batch only: on SmolLM2 (271 candidates) 8 rows of 128 tokens took 20 minutes."""
MAX_ROUNDS = 9
"""Compiles in all, the all-8-bit one included."""
SIZE_WORTH = 0.01
"""What quantizing an op is worth at least, as a share of its float time: an op that 8 bits
leave at the same speed still shrinks 4x. Keeping in float the ops of most error per worth
first, such an op goes before one that int8 speeds up by 30% only if its error is over 30x
smaller; among ops that all run at the same speed (an AVX2 host), the noisiest per unit of
work go first."""

Compile = Callable[[dict[str, str]], ir.Model]
"""Compiles the model with the given ops (node name -> reason) kept in float."""


@dataclasses.dataclass(frozen=True)
class OpCost:
    """What quantizing one op costs at the outputs and what it gains in speed."""

    node: str
    op_type: str
    alone_sqnr_db: float
    """The output SQNR with only this op quantized (inf until measured)."""
    gain_seconds: float
    """What 8 bits save on it per run of the first calibration batch; negative where int8 is
    slower."""
    float_seconds: float
    """Its time in float on the same batch."""
    measured: bool = True
    """The gain was timed on this host, not estimated (``--no-measure``)."""
    shape: OpShape | None = None
    """What its timing depended on (None where not timed)."""
    activation: str = ""
    """The float tensor its (first) quantized input reads."""
    fixed: str = ""
    """Why it stays float whatever the budget, other than its speed (an embedding table the
    budget needs in float)."""

    @property
    def slower(self) -> bool:
        """8 bits make it slower here, beyond the timings' noise: it stays float."""
        return self.gain_seconds < -SAME_SPEED * self.float_seconds

    @property
    def always_float(self) -> bool:
        """It stays float in every round: slower in 8 bits, or ``fixed``."""
        return self.slower or bool(self.fixed)


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What the plan measured, what it kept in float, and where it landed."""

    budget: Budget
    sample: str
    """What the budget was measured on, e.g. ``2 calibration batches``."""
    all_quantized: float
    """The budget's figure with every op 8 bits do not slow down quantized."""
    final: float
    kept_float: tuple[OpCost, ...]
    gain_share: float
    """The share of the measured int8 gain of all faster candidates that the model keeps."""
    rounds: int
    seconds: float
    gains_measured: bool = True
    """The int8 gains were timed on this host, not estimated by ``timing.CostModel``."""
    smoothing: str = ""
    """What the plan decided about SmoothQuant (``smoothquant = "auto"``), or empty."""
    rotation: str = ""
    """What the plan decided about rotating the model (``rotate = "auto"``), or empty."""
    wide: tuple[OpCost, ...] = ()
    """Ops out of 8 bits whose activations went to 16 (two 8-bit digits), with their gain."""
    sixteen_bit: str = ""
    """Why the ops kept in float did not go to 16-bit activations, where that was tried."""
    storage: str = ""
    """What the plan found storing the weights of the ops kept in float in 8 bits, if tried."""
    whole_model: str = ""
    """What timing the whole model in float and as compiled found, where the gains were timed
    on this host."""
    whole_model_slower: bool = False
    """The whole model ran slower with the plan's ops in 8 bits: every op stays float."""

    def kept_reasons(self) -> dict[str, str]:
        """Node name -> why the plan keeps it in float."""
        return kept_reasons(self.kept_float, self.budget)

    def summary(self) -> str:
        return "; ".join(
            part
            for part in (
                self._budget_summary(),
                self.whole_model,
                self.sixteen_bit,
                self.storage,
                self.smoothing,
                self.rotation,
            )
            if part
        )

    def _budget_summary(self) -> str:
        if self.whole_model_slower:
            return (
                f"accuracy budget {self.budget}: every op in float gives "
                f"{self.budget.show(self.final)} on {self.sample}"
            )
        slow = [op for op in self.kept_float if op.slower and not op.fixed]
        kept = len(self.kept_float) - len(slow)
        verb = "stays" if len(slow) == 1 else "stay"
        slower = f"; {counted(len(slow), 'op')} {verb} float, slower in 8 bits here" if slow else ""
        if not self.gains_measured:
            slower += " (int8 gains estimated, not timed: see --measure)"
        if not kept and not self.wide:
            every = "every op 8 bits do not slow down" if slow else "every candidate in 8 bits"
            return (
                f"accuracy budget {self.budget} met with {every} "
                f"({self.budget.show(self.all_quantized)} on {self.sample}){slower}"
            )
        wide = ""
        if self.wide:
            saved = sum(op.gain_seconds for op in self.wide)
            wide = (
                f"{len(self.wide)} of them with 16-bit activations (two 8-bit digits, "
                f"{saved * 1e3:.1f} ms faster than float here) and "
            )
        given_up = "of the int8 gain, with the 16-bit ones'" if self.wide else "of the int8 gain"
        return (
            f"accuracy budget {self.budget}: the ops 8 bits do not slow down gave "
            f"{self.budget.show(self.all_quantized)} on {self.sample}; {wide}{kept} of them kept "
            f"in float ({1 - self.gain_share:.0%} {given_up}) give "
            f"{self.budget.show(self.final)} ({self.rounds} rounds, {self.seconds:.0f} s){slower}"
        )


@dataclasses.dataclass(frozen=True)
class PlanSample:
    """The batches the plan measures its budget on, and what they are."""

    batches: list[Feeds]
    description: str


def plan_sample(
    calib: DataSource,
    held_out: DataSource | None = None,
    inputs: Mapping[str, ArraySpec] | None = None,
    rows: int = 0,
) -> PlanSample:
    """Every batch of ``held_out`` data, else the first ``PLAN_BATCHES`` of ``calib`` (more, up
    to ``PLAN_MAX_BATCHES``, until they hold ``PLAN_ROWS`` rows, and ``rows``: the budget's
    ``rows_to_resolve``), checked against the model's ``inputs`` (``data.read_batches``)."""
    if held_out is not None:
        batches = list(read_batches(held_out, inputs))
        return PlanSample(batches, f"{len(batches)} batches of the --eval data")
    batches = []
    for feeds in itertools.islice(read_batches(calib, inputs), PLAN_MAX_BATCHES):
        batches.append(feeds)
        if len(batches) >= PLAN_BATCHES and _rows(batches) >= max(PLAN_ROWS, rows):
            break
    return PlanSample(batches, f"{len(batches)} calibration batches")


def _rows(batches: list[Feeds]) -> int:
    """How many rows ``batches`` hold: the first dimension of each batch's first input."""
    return sum(next((int(np.shape(a)[0]) for a in b.values() if np.ndim(a)), 1) for b in batches)


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


def budget_score(
    budget: Budget, expected: list[dict], candidate: ir.Model, batches: list[Feeds]
) -> float:
    """``budget``'s figure for ``candidate``'s outputs against the ``expected`` ones."""
    if budget.figure is SQNR:
        return output_sqnr_db(expected, candidate, batches)
    metric = METRICS[budget.figure.metric]()
    compiled = session(candidate, optimize=True, threads=0)
    for feeds, reference in zip(batches, expected, strict=True):
        metric.update(feeds, reference, run(compiled, feeds))
    return metric.result()[budget.figure.key]


def plan(
    float_model: ir.Model,
    compile_with: Compile,
    sample: PlanSample,
    budget: Budget,
    speeds: list[OpCost],
    progress: Callable[[str], None] = lambda step: None,
    expected: list[dict] | None = None,
) -> tuple[ir.Model, PlanReport]:
    """The compiled model meeting ``budget`` with the fewest ops kept in float, from each
    candidate's measured speed (``speed_gains``); ops that int8 makes slower here
    (``OpCost.slower``) are kept in float whatever the budget. ``expected``: the float
    model's outputs on the sample, where the caller has them already."""
    start = time.perf_counter()
    batches = sample.batches
    if expected is None:
        expected = reference_outputs(float_model, batches)

    def report(all_quantized: float, final: float, kept: tuple[OpCost, ...], rounds: int):
        return plan_report(budget, sample, (all_quantized, final), kept, speeds, rounds, start)

    slow = [op for op in speeds if op.always_float]
    progress("plan: every op 8 bits do not slow down quantized")
    candidate = compile_with(kept_reasons(slow, budget))
    measured = budget_score(budget, expected, candidate, batches)
    if budget.met(measured):
        return candidate, report(measured, measured, tuple(slow), 1)
    if len(slow) == len(speeds):
        raise _unreachable(budget, measured)
    progress("plan: measuring each op's error alone at the outputs")
    impacts = _impacts(float_model, candidate, batches)
    costs = [
        dataclasses.replace(op, alone_sqnr_db=impacts[op.node])
        for op in speeds
        if not op.always_float and op.node in impacts
    ]
    order = sorted(costs, key=_error_per_gain, reverse=True)

    def measure(count: int) -> tuple[ir.Model, float]:
        model = compile_with(kept_reasons(slow + order[:count], budget))
        return model, budget_score(budget, expected, model, batches)

    count, candidate, final, rounds = _search(order, measured, budget, measure, progress)
    return candidate, report(measured, final, tuple(slow + order[:count]), rounds)


def _search(
    order: list[OpCost],
    measured: float,
    budget: Budget,
    measure: Callable[[int], tuple[ir.Model, float]],
    progress: Callable[[str], None],
) -> tuple[int, ir.Model, float, int]:
    """(count of ``order`` kept in float, its model, its budget figure, compiles in all, the
    first included): ``CountSearch``'s rounds, then every op in float if none passed."""
    search = CountSearch(
        [_noise(op.alone_sqnr_db) for op in order],
        budget.error(measured),
        budget.allowed_error,
    )
    passing: tuple[int, ir.Model, float] | None = None
    rounds, final = 1, measured
    while rounds < MAX_ROUNDS and (count := search.next_count()) is not None:
        rounds += 1
        progress(f"plan: round {rounds}, {count} more ops kept in float")
        candidate, final = measure(count)
        logger.info("plan round %d: %d ops float, %s", rounds, count, budget.show(final))
        search.record(count, budget.error(final))
        if budget.met(final) and (passing is None or count < passing[0]):
            passing = (count, candidate, final)
    if passing is not None:
        return (*passing, rounds)
    if search.failing < len(order):  # the rounds ran out before every op was tried in float
        candidate, final = measure(len(order))
        rounds += 1
    if not budget.met(final):
        raise _unreachable(budget, final)
    return len(order), candidate, final, rounds


class CountSearch:
    """How many ops of the plan's order to keep in float: about the smallest count whose output
    noise is within the allowed noise, in few compiles.

    ``N(c)``, the output noise (per unit of signal, or any error growing with it: the
    budget's) with the first ``c`` ops kept in float, falls about in proportion to their
    errors alone (in any unit: only their ratios are read): ``N(c) ~ N(0) - k C(c)``, ``C(c)`` the
    sum of the first ``c`` alone errors. The first guess takes ``k = N(0) / C(all)`` (errors
    compound, so alone they add up to less than ``N(0)``). Each measure refits the line: until
    a count passes, through ``(0, N(0))`` and the largest failing count (at least doubling
    after two failures in a row); then between the largest failing and the smallest passing
    count, by the Illinois variant of regula falsi (when the same end moves twice in a row,
    the other end's excess noise is halved, so the bracket closes from both sides). The search
    ends when the bracket is within ``TOLERANCE`` of the candidates (one op on small models),
    or every count failed.
    """

    TOLERANCE = 0.02

    def __init__(self, alone: list[float], measured: float, allowed: float) -> None:
        self.cumulative = list(itertools.accumulate(alone, initial=0.0))
        self.start_noise, self.allowed = measured, allowed
        self.failing, self.failing_excess = 0, measured - allowed
        self.passing: int | None = None
        self.passing_excess = 0.0
        self._last_passed: bool | None = None
        self._same_side = 0

    @property
    def total(self) -> int:
        return len(self.cumulative) - 1

    def next_count(self) -> int | None:
        """The next count to measure, or None once the search is over."""
        if self.passing is None:
            if self.failing == self.total:
                return None
            guess = self._extrapolated()
            if self._same_side >= 2:
                guess = max(guess, 2 * self.failing)
            return min(max(guess, self.failing + 1), self.total)
        if self.passing - self.failing <= max(1, math.ceil(self.TOLERANCE * self.total)):
            return None
        return min(max(self._interpolated(), self.failing + 1), self.passing - 1)

    def record(self, count: int, noise: float) -> None:
        passed = noise <= self.allowed
        self._same_side = self._same_side + 1 if passed == self._last_passed else 1
        self._last_passed = passed
        if passed:
            self.passing, self.passing_excess = count, noise - self.allowed
            if self._same_side >= 2:
                self.failing_excess /= 2
        else:
            self.failing, self.failing_excess = count, noise - self.allowed
            if self._same_side >= 2:
                self.passing_excess /= 2

    def _extrapolated(self) -> int:
        """The count at which the line through ``(0, N(0))`` and the largest failing count
        (the first guess's slope before any) reaches the allowed noise."""
        needed = self.start_noise - self.allowed
        removed = needed - self.failing_excess if self.failing else self.start_noise
        alone = self.cumulative[self.failing] if self.failing else self.cumulative[-1]
        if alone <= 0 or removed <= 0:
            return 2 * self.failing
        return self._count_reaching(needed * alone / removed)

    def _interpolated(self) -> int:
        """The count at which the line through the bracket's two ends reaches the allowed
        noise."""
        low, high = self.cumulative[self.failing], self.cumulative[self.passing]
        fall = self.failing_excess - self.passing_excess
        share = self.failing_excess / fall if fall > 0 else 0.5
        return self._count_reaching(low + share * (high - low))

    def _count_reaching(self, alone: float) -> int:
        """The smallest count whose summed alone errors reach ``alone``."""
        return bisect.bisect_left(self.cumulative, alone)


def plan_report(
    budget: Budget,
    sample: PlanSample,
    figures: tuple[float, float],
    kept: tuple[OpCost, ...],
    speeds: list[OpCost],
    rounds: int,
    start: float,
) -> PlanReport:
    """``figures``: the budget's figure with every faster op quantized, and at the end."""
    return PlanReport(
        budget,
        sample.description,
        *figures,
        kept,
        gain_share(kept, speeds),
        rounds,
        time.perf_counter() - start,
        gains_measured=all(op.measured for op in speeds),
    )


def gain_share(
    kept: tuple[OpCost, ...], speeds: list[OpCost], wide: tuple[OpCost, ...] = ()
) -> float:
    """The share of the int8 gain of all faster candidates left after keeping ``kept`` in
    float and giving ``wide`` (their 16-bit gains) 16-bit activations."""
    int8 = {op.node: max(op.gain_seconds, 0.0) for op in speeds}
    faster = sum(int8.values()) or 1.0
    lost = sum(int8.get(op.node, 0.0) for op in kept)
    lost += sum(max(int8.get(op.node, 0.0) - op.gain_seconds, 0.0) for op in wide)
    return 1 - lost / faster


SIXTEEN_BIT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
"""The ops whose activation a target with ``int16_digits`` runs as two 8-bit digits."""


def sixteen_bit_costs(
    kept: tuple[OpCost, ...], target: TargetSpec, timer: Timer | None = None
) -> list[OpCost]:
    """Of the ops ``kept`` in float for accuracy, those whose activation could go to 16 bits
    (two 8-bit digits, ``passes/lowering/digits.py``) without running slower than float here,
    each with its 16-bit gain: ``timer``'s seconds of the op with a 16-bit activation."""
    if not target.activations.as_digits(16):
        return []
    timer = timer or default_cache()
    found = []
    for op in kept:
        if op.always_float or op.op_type not in SIXTEEN_BIT_OPS:
            continue
        if op.shape is None or op.shape.weight is None:  # a product of two computed tensors
            continue
        wide = dataclasses.replace(op.shape, activation_bits=16, quantized_output=False)
        float_time, wide_time = timer.seconds(wide, target)
        cost = dataclasses.replace(
            op, gain_seconds=float_time - wide_time, float_seconds=float_time, shape=wide
        )
        if not cost.slower:
            found.append(cost)
    return found


def storable(kept: tuple[OpCost, ...]) -> list[OpCost]:
    """Of the ops ``kept`` in float, those whose constant weight could be stored in 8 bits and
    expanded at load (``passes/stored_weights.py``): as fast as float, 4x smaller."""
    return [
        op
        for op in kept
        if op.op_type in STORED_OPS and op.shape is not None and op.shape.weight is not None
    ]


class BudgetError(QGraphError):
    """The accuracy budget cannot be met."""


def _unreachable(budget: Budget, float_value: float) -> BudgetError:
    return BudgetError(
        f"the accuracy budget ({budget}) cannot be met: with every candidate op in float the "
        f"outputs score {budget.show(float_value)} against the float model (what stays "
        "quantized, embedding tables, sets that); loosen --budget, or --budget none"
    )


def kept_reasons(ops: tuple[OpCost, ...] | list[OpCost], budget: Budget) -> dict[str, str]:
    return {op.node: _reason(op, budget) for op in ops}


def _reason(op: OpCost, budget: Budget) -> str:
    if op.fixed:
        return op.fixed
    if op.slower:
        how = "ran" if op.measured else "would run"
        source = "measured" if op.measured else "estimated"
        return (
            f"kept in float by the accuracy plan: in 8 bits it {how} slower here "
            f"({-op.gain_seconds * 1e3:.3f} ms more, {source})"
        )
    return (
        f"kept in float by the accuracy plan: alone in 8 bits it takes the outputs to "
        f"{op.alone_sqnr_db:.1f} dB SQNR (budget: {budget})"
    )


def _noise(sqnr_db: float) -> float:
    """Noise energy per unit of signal at ``sqnr_db``."""
    return 10 ** (-sqnr_db / 10)


def _error_per_gain(op: OpCost) -> float:
    return _noise(op.alone_sqnr_db) / max(op.gain_seconds, SIZE_WORTH * op.float_seconds)


def _impacts(float_model: ir.Model, candidate: ir.Model, batches: list[Feeds]) -> dict[str, float]:
    """Node name -> the output SQNR with only that op quantized, on the impact sample."""
    sample = [{name: array[:IMPACT_ROWS] for name, array in batches[0].items()}]
    if not all(_dynamic_batch(value) for value in float_model.graph.inputs):
        sample = batches[:1]
    report = debug_accuracy(float_model, candidate, sample, impact_batches=1)
    return {op.node: _alone(op) for op in report.ops}


def _alone(op: OpError) -> float:
    return op.output_sqnr_db if op.output_sqnr_db is not None else op.local_sqnr_db


def speed_gains(
    candidate: ir.Model, feeds: Feeds, target: TargetSpec, timer: Timer | None = None
) -> list[OpCost]:
    """What 8 bits save on each quantized op of ``candidate`` (``is_qdq_group``: the plan's
    candidates, not the float ops reading a dequantized value) on ``feeds``: ``timer``'s
    seconds at the op's shapes, measured on this host by default (``qgraph.timing``)."""
    timer = timer or default_cache()
    ops = [node for node in candidate.graph if is_qdq_group(node) and node.op_type in TIMED_OPS]
    sources = {v.name: _float_source(v).name for n in ops for v in n.inputs[:2] if v is not None}
    shapes = _value_shapes(candidate, feeds, set(sources.values()))
    speeds = []
    for node in ops:
        if sources[node.inputs[0].name] not in shapes:
            continue
        read = {
            v.name: shapes[sources[v.name]]
            for v in node.inputs[:2]
            if v is not None and sources[v.name] in shapes
        }
        shape = op_shape(node, read, target)
        float_seconds, int8_seconds = timer.seconds(shape, target)
        gain = float_seconds - int8_seconds
        activation = sources[node.inputs[0].name]
        speeds.append(
            OpCost(
                node.name,
                node.op_type,
                math.inf,
                gain,
                float_seconds,
                timer.measured,
                shape,
                activation,
            )
        )
    return speeds


TABLE_FOR_BUDGET = (
    "kept in float by the accuracy plan: with the embedding tables in 8 bits the budget is out "
    "of reach even with every candidate in float"
)


def table_costs(
    float_model: ir.Model,
    feeds: Feeds,
    speeds: list[OpCost],
    target: TargetSpec,
    timer: Timer,
    every: bool = False,
) -> list[OpCost]:
    """The embedding tables to keep in float: those whose 8-bit rows' dequantization costs a
    larger share of the model's time (the float time of ``speeds``, its timed ops) than the
    share of its weight bytes their 8 bits save. A language model gathers a few rows of a
    large table per run and keeps it in 8 bits; magika gathers 2048 rows of a 258-row byte
    table per sample, whose dequantization took 6% of its time to save 1.6% of its size.
    Each comes back as an ``OpCost`` that 8 bits make slower, kept float in every round.
    ``every``: all the tables not in ``speeds`` yet, ``fixed`` float (``TABLE_FOR_BUDGET``):
    the plan's fallback where the budget is out of reach with them in 8 bits (magika's byte
    table, its bias and GELU folded in, costs 1% of top-1 agreement in 8 bits)."""
    if not target.kernels.embeddings:
        return []
    tables = [node for node in float_model.graph if embedding_table(node) is not None]
    if not tables:
        return []
    shapes = _value_shapes(float_model, feeds, {node.inputs[1].name for node in tables})
    model_seconds = sum(op.float_seconds for op in speeds) or math.inf
    model_bytes = sum(v.const_value.nbytes for v in float_model.graph.initializers.values())
    kept = []
    for node in tables:
        if any(op.node == node.name for op in speeds):
            continue
        table = node.inputs[0].const_value
        shape = OpShape("Gather", (shapes[node.inputs[1].name],), tuple(table.shape), (), False)
        float_time, int8_time = timer.seconds(shape, target)
        time_share = (int8_time - float_time) / model_seconds
        cost = OpCost(
            node.name, node.op_type, math.inf, float_time - int8_time, float_time, timer.measured
        )
        if every:
            kept.append(dataclasses.replace(cost, fixed=TABLE_FOR_BUDGET))
        elif cost.slower and time_share > 0.75 * table.nbytes / model_bytes:  # 8 bits: 1/4
            kept.append(cost)
    return kept


def float_seconds(
    model: ir.Model, feeds: Feeds, nodes: list[ir.Node], target: TargetSpec, timer: Timer | None
) -> float:
    """The seconds the float ``nodes`` of ``model`` (an online rotation's MatMuls) take on
    ``feeds``, by ``timer`` (this host's timings by default); ops of other types count 0."""
    timer = timer or default_cache()
    timed = [node for node in nodes if node.op_type in TIMED_OPS]
    data = {v.name for node in timed for v in node.inputs[:2] if v.const_value is None}
    shapes = _value_shapes(model, feeds, data)

    def shape(value: ir.Value) -> tuple[int, ...]:
        return (
            tuple(value.const_value.shape) if value.const_value is not None else shapes[value.name]
        )

    return sum(
        timer.seconds(op_shape(node, {v.name: shape(v) for v in node.inputs[:2]}, target), target)[
            0
        ]
        for node in timed
    )


def _value_shapes(model: ir.Model, feeds: Feeds, names: set[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of the values ``names`` of ``model`` (and of its inputs) on ``feeds``."""
    probe = ir.from_proto(ir.to_proto(model))  # its float values have the float shapes
    expose_values(probe, names)
    shapes = {name: np.shape(array) for name, array in feeds.items()}
    return shapes | {name: np.shape(a) for name, a in run(probe, feeds, optimize=True).items()}


def _float_source(value: ir.Value) -> ir.Value:
    """The float tensor behind ``value``, through its DequantizeLinear and QuantizeLinear."""
    while (producer := value.producer()) is not None and producer.op_type in (
        "DequantizeLinear",
        "QuantizeLinear",
    ):
        value = producer.inputs[0]
    return value
