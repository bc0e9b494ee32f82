"""The accuracy budget: what a compiled model must keep of its float model's outputs.

A budget bounds one figure that compares the compiled model's outputs with the float model's
on the same batches (the metrics of ``qgraph.evaluation``), written ``NAME>=BOUND`` or
``NAME<=BOUND``; a bare number is an output SQNR in dB:

==============  =========================================  ========  ===================
name            figure                                     holds     error ``e(v)``
==============  =========================================  ========  ===================
``sqnr``        SQNR of all outputs together, dB           >= bound  ``10^(-v / 10)``
``top1``        top-1 agreement (share of samples)         >= bound  ``1 - v``
``cosine``      mean cosine of the first output's rows     >= bound  ``1 - v``
``ppl-ratio``   perplexity ratio, compiled / float         <= bound  ``ln v``
==============  =========================================  ========  ===================

The plan (``qgraph.planning``) searches in the error ``e(v)``, which grows with the output
noise energy ``N`` per unit of signal ``S``: ``N / S`` itself for SQNR; ``1 - cos ~ N / 2S``
for small noise; ``ln`` of the perplexity ratio is the mean cross-entropy added, second order
in the logits' noise, so about in proportion to ``N`` too. Top-1 disagreement grows with the
noise's spread (samples whose top two classes are closer than it flip), monotone but not in
proportion; the plan's secant steps bracket it all the same.

Without ``--budget``, the data says how the model is judged: a dataset folder's
``dataset.json`` ``metric`` (``top1``, ``embedding``, ``causal-lm``) picks its default budget
in ``DEFAULT_BUDGETS``; data without one gets 26 dB SQNR.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

from qgraph.data import DataSource, read_info
from qgraph.errors import QGraphError


class BudgetSyntaxError(QGraphError):
    """A budget that cannot be read."""


@dataclasses.dataclass(frozen=True)
class Figure:
    """One figure a budget can bound."""

    name: str
    """As written in a budget."""
    label: str
    metric: str
    """The ``qgraph.evaluation`` metric computing it (``generic``: qgraph.planning's SQNR of
    all outputs together)."""
    key: str
    """Its key in that metric's result."""
    higher_is_better: bool
    error: Callable[[float], float]
    """The figure as an error growing with the output noise (the module docstring's table)."""
    shown: str
    """Format of a value, e.g. ``{:.1f} dB``."""
    low: float
    high: float
    """The range a bound may take."""
    perfect: float
    """The float model's own figure (its outputs against themselves)."""
    share_of_samples: bool = False
    """The figure is a share of samples (each one counts ``1 / rows``), not a mean value."""

    @property
    def relation(self) -> str:
        """How a budget bounds it: ``>=`` or ``<=``."""
        return ">=" if self.higher_is_better else "<="


SQNR = Figure(
    name="sqnr",
    label="output SQNR",
    metric="generic",
    key="sqnr_db",
    higher_is_better=True,
    error=lambda v: 10 ** (-v / 10),
    shown="{:.1f} dB",
    low=0,
    high=100,
    perfect=math.inf,
)
TOP1 = Figure(
    name="top1",
    label="top-1 agreement",
    metric="top1",
    key="top1_agreement",
    higher_is_better=True,
    error=lambda v: 1 - v,
    shown="{:.2%}",
    low=0,
    high=1,
    perfect=1.0,
    share_of_samples=True,
)
COSINE = Figure(
    name="cosine",
    label="mean cosine",
    metric="embedding",
    key="mean_cosine",
    higher_is_better=True,
    error=lambda v: 1 - v,
    shown="{:.4f}",
    low=-1,
    high=1,
    perfect=1.0,
)
PERPLEXITY_RATIO = Figure(
    name="ppl-ratio",
    label="perplexity ratio",
    metric="causal-lm",
    key="perplexity_ratio",
    higher_is_better=False,
    error=math.log,
    shown="{:.3f}",
    low=1,
    high=100,
    perfect=1.0,
)
FIGURES = {figure.name: figure for figure in (SQNR, TOP1, COSINE, PERPLEXITY_RATIO)}
METRIC_FIGURES = {figure.metric: figure for figure in FIGURES.values()}
"""A ``qgraph.evaluation`` metric -> the figure it is judged by."""


RESOLVED_SAMPLES = 2
"""Disagreements a model exactly at a share-of-samples bound shows on the plan's sample."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """A bound on one figure of the compiled model's outputs against the float model's."""

    figure: Figure
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.figure.higher_is_better else value <= self.bound

    def error(self, value: float) -> float:
        """``value`` as an error that grows with the output noise (0 or less: none)."""
        return self.figure.error(value)

    @property
    def allowed_error(self) -> float:
        return self.figure.error(self.bound)

    def rows_to_resolve(self) -> int:
        """How many rows the plan's sample needs for this budget to tell a model at its
        bound from one with no error: a share of samples moves in steps of ``1 / rows``, so
        a model at ``top1>=0.995`` shows ``RESOLVED_SAMPLES`` disagreements on 400 rows;
        on 128 a model at 98.7% passed (magika, its table folded and in 8 bits). 0 for a
        mean figure."""
        if not self.figure.share_of_samples or self.allowed_error <= 0:
            return 0
        return math.ceil(round(RESOLVED_SAMPLES / self.allowed_error, 6))

    def show(self, value: float) -> str:
        """``value`` as its figure is read, e.g. ``25.3 dB``."""
        return self.figure.shown.format(value)

    @property
    def text(self) -> str:
        """The budget as written (``cosine>=0.995``; a recipe or flag reads it back)."""
        return f"{self.figure.name}{self.figure.relation}{self.bound:g}"

    def __str__(self) -> str:
        return f"{self.figure.label} {self.figure.relation} {self.show(self.bound)}"


DEFAULT_SQNR_DB = 26.0
DEFAULT_BUDGETS = {
    "top1": Budget(TOP1, 0.995),
    "embedding": Budget(COSINE, 0.995),
    "causal-lm": Budget(PERPLEXITY_RATIO, 1.03),
    "generic": Budget(SQNR, DEFAULT_SQNR_DB),
}
"""A dataset's ``metric`` -> the budget a compile on it keeps unless told otherwise: the zoo's
accuracy goals (top-1 agreement 99.5%, mean cosine 0.995, perplexity ratio 1.03), measured
on the plan's sample. Without ``--eval`` that sample is two calibration batches, which set the
scales and so flatter the model; the perplexity ratio, a mean over about a thousand tokens,
flatters the most (SmolLM2 on an AVX2 host: 1.026 on the sample, 1.032 on 8128 held-out
tokens). A margin does not buy it back: ``ppl-ratio<=1.02`` kept in float all 61 SmolLM2 ops
int8 speeds up there (1.006 on the sample, size 0.99), so ``--eval`` is the remedy.
(MiniLM's mean cosine: 0.9982 on the sample, 0.9981 held out.) A top-1 agreement is judged
on at least ``Budget.rows_to_resolve`` rows (400 for 99.5%), as many calibration batches as
that takes."""

_WRITTEN = re.compile(r"\s*([a-z0-9-]+)\s*(>=|<=)\s*([^\s]+)\s*")


def parse_budget(text: str | float) -> Budget:
    """``26``, ``sqnr>=26``, ``top1>=0.995``, ``cosine>=0.995``, ``ppl-ratio<=1.03``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _bounded(SQNR, float(text), str(text))
    if not isinstance(text, str):
        raise BudgetSyntaxError(f"budget {text!r}: expected a number (dB) or NAME>=BOUND")
    if (number := _number(text)) is not None:
        return _bounded(SQNR, number, text)
    written = _WRITTEN.fullmatch(text)
    if written is None or written[1] not in FIGURES:
        raise BudgetSyntaxError(
            f"budget '{text}': expected an output SQNR in dB or NAME>=BOUND / NAME<=BOUND "
            f"with NAME one of {', '.join(FIGURES)} (e.g. cosine>=0.995, ppl-ratio<=1.03)"
        )
    figure = FIGURES[written[1]]
    if written[2] != figure.relation or (bound := _number(written[3])) is None:
        raise BudgetSyntaxError(
            f"budget '{text}': {figure.name} is bounded as {figure.relation} NUMBER"
        )
    return _bounded(figure, bound, text)


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _bounded(figure: Figure, bound: float, text: str) -> Budget:
    if not figure.low <= bound <= figure.high:
        raise BudgetSyntaxError(
            f"budget '{text}': a {figure.label} bound lies in [{figure.low:g}, {figure.high:g}]"
        )
    return Budget(figure, bound)


def default_budget(data: DataSource | None) -> Budget:
    """The budget ``data``'s ``dataset.json`` metric asks for (``DEFAULT_BUDGETS``); SQNR
    where it names none or one without a default."""
    return DEFAULT_BUDGETS.get(read_info(data).metric or "generic", DEFAULT_BUDGETS["generic"])


def defaults_text() -> str:
    """``DEFAULT_BUDGETS`` as read in ``--help``: ``top1: top1>=0.995, ...``."""
    return ", ".join(
        f"{metric}: {budget.text}"
        for metric, budget in DEFAULT_BUDGETS.items()
        if metric != "generic"
    )
