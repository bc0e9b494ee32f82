"""Calibration: run the float model on sample inputs and choose a range for each tensor.

Calibration is not a pass. ``collect_statistics`` runs the model in onnxruntime on every batch
of a dataset, reading the tensors the Q/DQ insertion pass asks for, and keeps streaming
statistics of each (``TensorStatistics``): the running minimum and maximum, the number of
elements, and, for the methods that need it, a histogram of ``|x|``. ``tensor_range`` then
turns statistics into a range ``(lo, hi)`` by one of the methods in ``METHODS``.

The histogram has ``B = HISTOGRAM_BINS`` bins of width ``w = R / B`` over ``[0, R]``. Bins are
closed on the right: bin ``j`` holds ``j w < |x| <= (j + 1) w`` (bin 0 holds 0 too). The first
batch sets ``R = max|x|``. A later batch with ``max|x| > R`` first grows the range to
``R 2^k`` (the smallest k that covers it) and merges each ``2^k`` adjacent old bins into one
new bin; the new bins' edges are old edges, so the merged histogram is exactly the one a single
pass over all batches would build over the grown range. (Right-closed bins keep this exact at
the old maximum, which sits on the old range's upper edge.) Until a nonzero ``|x|`` is seen,
``R = 0`` and every element is in bin 0.

The histogram methods find a threshold ``T`` on ``|x|`` and give
``(max(minimum, -T), min(maximum, T))``. ``L`` is the number of quantization steps on the
``|x|`` side: 128 when the tensor has negative values (int8), else 256 (uint8). With counts
``h_j``, ``N = sum h``:

- ``minmax``: ``(minimum, maximum)``.
- ``percentile``: ``T`` is the upper edge of the first bin where ``sum_{j' <= j} h_j'`` reaches
  ``percentile / 100 * N``.
- ``entropy`` (TensorRT's KL calibration): for each ``i`` in ``L..B`` keep the first ``i``
  bins. ``P = h[:i]`` with the outliers ``sum h[i:]`` added to ``P[i-1]``; ``Q`` splits ``h[:i]``
  into ``L`` contiguous groups (sizes as ``np.array_split``) and spreads each group's total
  evenly over the group's nonzero bins (its zero bins stay zero). With ``p = P / N`` and
  ``q = Q / sum(h[:i])``, ``KL(p || q) = sum_{p_j > 0} p_j log(p_j / q_j)``, where a ``q_j = 0``
  counts as ``KL_EPSILON``. ``T = i w`` for the ``i`` of least KL (the first within
  ``KL_TIE_TOLERANCE``). All ``i`` are evaluated at once from prefix sums: every bin of a
  group with total ``G`` over ``n`` nonzero bins has ``q = G / (n C)``, ``C = sum h[:i]``.
- ``mse``: over the bin upper edges ``T = (t + 1) w`` (every bin, evaluated at once), ``T``
  minimizes the expected squared error of quantizing ``|x|`` uniformly with step ``T / L``,
  each bin's elements standing at its center ``c``:
  ``sum_{c <= T} h (T / L)^2 / 12 + sum_{c > T} h (c - T)^2``.

Elements that are NaN or infinite are left out of every statistic and clear
``TensorStatistics.finite``; the Q/DQ pass keeps such tensors in float.

A range is dominated by a few values (``dominated``) when both hold: ``max|x|`` is more than
``DOMINANCE_RATIO`` times ``P``, the upper edge of the bin where the nonzero elements' count
reaches ``DOMINANCE_PERCENTILE`` % (the exact zeros, counted apart in ``zeros``, are taken out
of bin 0 first, so a ReLU output of mostly zeros is not dominated); and the chosen scale ``s``
puts over ``ZEROED_SHARE`` of the nonzero elements at 0 (those in bins whose upper edge is at
most ``s / 2``). One 1e30 among normal batches puts every normal value in bin 0
(``w = R / 2048``), so ``P <= w``, and every method's scale zeroes them all; the Q/DQ pass then
keeps the tensor's readers in float, naming the batch that held ``max|x|`` (``peak_batch``).
A heavy tail alone (attention probabilities) or a scale that still resolves the bulk is not
dominated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.data import DataSource, Feeds, batch_files, input_specs, read_batches
from qgraph.errors import QGraphError
from qgraph.verify import session

HISTOGRAM_BINS = 2048
KL_EPSILON = 1e-10
"""The probability ``q`` stands for where Q leaves a bin empty that P fills."""
KL_TIE_TOLERANCE = 1e-9
"""KL divergences (nats) closer than this count as tied: rounding must not pick among them."""
RANDOM_INTEGER_LIMIT = 100
DOMINANCE_PERCENTILE = 90.0
"""The share (%) of a tensor's nonzero elements that make its bulk."""
DOMINANCE_RATIO = 1000.0
"""``max|x|`` over the bulk's edge beyond which a few values dominate the range."""
ZEROED_SHARE = 0.5
"""The share of nonzero elements a dominated range's scale quantizes to 0."""
CALIBRATION_THREADS = 0
"""onnxruntime's intra-op threads while calibrating: 0 is one per physical core."""
"""Random integer inputs are drawn from ``[0, RANDOM_INTEGER_LIMIT)``."""


class CalibrationError(QGraphError):
    """Calibration cannot run on this model and data."""


class TensorStatistics:
    """Streaming statistics of one tensor's finite elements; memory independent of batches.

    ``minimum`` and ``maximum`` are ``+inf`` and ``-inf`` until a finite element is seen;
    ``count`` counts the finite elements, ``zeros`` those exactly 0; ``peak_batch`` is the
    batch (from 1) that held the largest ``|x|``; ``histogram`` (counts of ``|x|``, see the
    module doc) is None unless asked for.
    """

    def __init__(self, histogram: bool = False) -> None:
        self.minimum = float("inf")
        self.maximum = float("-inf")
        self.count = 0
        self.zeros = 0
        self.batches = 0
        self.peak_batch = 0
        self.finite = True
        self.histogram: np.ndarray | None = (
            np.zeros(HISTOGRAM_BINS, dtype=np.int64) if histogram else None
        )
        self.histogram_range = 0.0

    @property
    def bin_width(self) -> float:
        return self.histogram_range / HISTOGRAM_BINS

    @property
    def absmax(self) -> float:
        """``max|x|`` so far (0 before any finite element)."""
        return max(-self.minimum, self.maximum, 0.0)

    def update(self, x: np.ndarray) -> None:
        """Add the elements of ``x`` (any shape and numeric dtype)."""
        values = np.asarray(x, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        self.batches += 1
        if not finite.all():
            self.finite = False
            values = values[finite]
        if values.size == 0:
            return
        if max(-float(values.min()), float(values.max())) > self.absmax:
            self.peak_batch = self.batches
        self.count += values.size
        self.zeros += values.size - int(np.count_nonzero(values))
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        if self.histogram is not None:
            self._add_magnitudes(np.abs(values))

    def _add_magnitudes(self, magnitudes: np.ndarray) -> None:
        largest = float(magnitudes.max())
        if largest > self.histogram_range:
            self._grow_range(largest)
        bins = _bin_indices(magnitudes, self.histogram_range)
        self.histogram += np.bincount(bins, minlength=HISTOGRAM_BINS)

    def _grow_range(self, largest: float) -> None:
        if self.histogram_range == 0.0:  # only zeros so far: bin 0 at any range
            self.histogram_range = largest
            return
        factor = 1
        while self.histogram_range * factor < largest:
            factor *= 2
        merged = np.zeros_like(self.histogram)
        np.add.at(merged, np.arange(HISTOGRAM_BINS) // min(factor, HISTOGRAM_BINS), self.histogram)
        self.histogram = merged
        self.histogram_range *= factor


def _bin_indices(magnitudes: np.ndarray, top: float) -> np.ndarray:
    """The right-closed bin of each magnitude in ``[0, top]``."""
    if top == 0.0:
        return np.zeros(magnitudes.size, dtype=np.intp)
    above = np.ceil(magnitudes / (top / HISTOGRAM_BINS)).astype(np.intp) - 1
    return np.clip(above, 0, HISTOGRAM_BINS - 1)


class ChannelStatistics:
    """Per-channel minimum and maximum of one tensor, and a held-out sample of its slices.

    Channels lie along ``axis``. A unit is the tensor's last ``unit_rank`` axes (1: a row
    ``[K]`` of a MatMul input; 3: an image ``[C, H, W]`` of a Conv input). With a
    ``sample_size``, searches that need real values (SmoothQuant's alpha) get ``sample``: up to
    that many units drawn uniformly (reservoir sampling with random keys, seeded so that a
    compile is reproducible) from the odd-numbered units (counted over all batches), and
    ``fitted_minimum`` / ``fitted_maximum``: the per-channel range of the even-numbered ones. A
    range fitted on data the sample is not part of lets a search see the clipping that new
    data meets. Units of every batch must have one shape.
    """

    def __init__(self, axis: int, unit_rank: int = 1, sample_size: int = 0, seed: int = 0) -> None:
        self.axis = axis
        self.unit_rank = unit_rank
        self.sample_size = sample_size
        self.minimum: np.ndarray | None = None
        self.maximum: np.ndarray | None = None
        self.fitted_minimum: np.ndarray | None = None
        self.fitted_maximum: np.ndarray | None = None
        self.sample: np.ndarray | None = None
        self._units = 0
        self._keys = np.empty(0)
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        self.minimum, self.maximum = self._widened(x, self.minimum, self.maximum, self.axis)
        if not self.sample_size:
            return
        units = x.reshape(-1, *x.shape[x.ndim - self.unit_rank :])
        axis = self.axis % x.ndim - (x.ndim - self.unit_rank) + 1
        first_even = self._units % 2
        self._units += len(units)
        self.fitted_minimum, self.fitted_maximum = self._widened(
            units[first_even::2], self.fitted_minimum, self.fitted_maximum, axis
        )
        self._sample(units[1 - first_even :: 2])

    @property
    def absmax(self) -> np.ndarray:
        """``max |x_j|`` per channel."""
        return np.maximum(-self.minimum, self.maximum)

    @staticmethod
    def _widened(x: np.ndarray, low: np.ndarray | None, high: np.ndarray | None, axis: int):
        """``[low, high]`` widened to hold ``x`` per channel; as it was if ``x`` is empty (a
        batch of one unit at an odd position gives the fitted range none)."""
        if x.size == 0:
            return low, high
        others = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        x_low, x_high = x.min(axis=others), x.max(axis=others)
        if low is None:
            return x_low, x_high
        return np.minimum(low, x_low), np.maximum(high, x_high)

    def _sample(self, units: np.ndarray) -> None:
        keys = np.concatenate([self._keys, self._rng.random(len(units))])
        pool = units if self.sample is None else np.concatenate([self.sample, units])
        kept = np.argsort(keys, kind="stable")[: self.sample_size]
        self._keys, self.sample = keys[kept], pool[kept].astype(np.float32)


# Range methods


@dataclasses.dataclass(frozen=True)
class RangeOptions:
    """Parameters of the range methods (each reads the ones it needs)."""

    percentile: float = 99.999

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile}")


def minmax_range(stats: TensorStatistics, options: RangeOptions) -> tuple[float, float]:
    """The smallest and largest element seen."""
    return stats.minimum, stats.maximum


def percentile_range(stats: TensorStatistics, options: RangeOptions) -> tuple[float, float]:
    """``|x|`` clipped at the bin edge below which ``options.percentile`` % of elements lie."""
    histogram = _histogram(stats)
    target = options.percentile * stats.count / 100.0
    last = int(np.searchsorted(np.cumsum(histogram), target))
    return _clipped(stats, (last + 1) * stats.bin_width)


def entropy_range(stats: TensorStatistics, options: RangeOptions) -> tuple[float, float]:
    """``|x|`` clipped where the quantized histogram loses the least information (KL)."""
    levels = _levels(stats)
    divergences = kl_divergences(_histogram(stats), levels)
    best = int(np.argmax(divergences <= divergences.min() + KL_TIE_TOLERANCE))
    return _clipped(stats, (levels + best) * stats.bin_width)


def mse_range(stats: TensorStatistics, options: RangeOptions) -> tuple[float, float]:
    """``|x|`` clipped where uniform quantization has the least expected squared error."""
    errors = quantization_errors(_histogram(stats), _levels(stats))
    return _clipped(stats, (int(np.argmin(errors)) + 1) * stats.bin_width)


def kl_divergences(histogram: np.ndarray, levels: int) -> np.ndarray:
    """``KL(p || q)`` of the entropy method for each kept bin count ``i`` in ``levels..B``."""
    h = histogram.astype(np.float64)
    total = h.sum()
    kept = np.arange(levels, HISTOGRAM_BINS + 1)
    prefix = _prefix_sums(h)
    inside = prefix[kept]
    outliers = total - inside
    last = h[kept - 1]

    group_totals, group_nonzero = _group_sums(h, kept, levels)
    group_q = _safe_divide(group_totals, group_nonzero * inside[:, None])
    last_q = np.where(last > 0, group_q[:, -1], KL_EPSILON)

    p_log_p = _prefix_sums(_xlogx(h))[kept - 1] + _xlogx(last + outliers)
    p_log_q = _xlogy(group_totals, group_q).sum(axis=1) + _xlogy(outliers, last_q)
    return (p_log_p - p_log_q) / total - np.log(total)


def quantization_errors(histogram: np.ndarray, levels: int) -> np.ndarray:
    """Expected squared error (in bin widths squared) of the mse method at each bin's upper
    edge ``T = t + 1``: rounding inside ``[0, T]`` plus clipping above."""
    h = histogram.astype(np.float64)
    centers = np.arange(HISTOGRAM_BINS) + 0.5
    thresholds = np.arange(1, HISTOGRAM_BINS + 1, dtype=np.float64)
    inside = _prefix_sums(h)[1:]  # centers t + 0.5 <= t + 1: bins 0..t
    above = [_suffix_sums(h * centers**power)[1:] for power in range(3)]
    clipping = above[2] - 2 * thresholds * above[1] + thresholds**2 * above[0]
    rounding = inside * (thresholds / levels) ** 2 / 12
    return rounding + np.maximum(clipping, 0.0)


def _group_sums(h: np.ndarray, kept: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """For each kept count ``i``, the totals and nonzero-bin counts of ``h[:i]`` split into
    ``levels`` groups as ``np.array_split`` does (the first ``i % levels`` one bin longer)."""
    size, longer = np.divmod(kept, levels)
    group = np.arange(levels + 1)
    edges = group * size[:, None] + np.minimum(group, longer[:, None])
    totals = np.diff(_prefix_sums(h)[edges], axis=1)
    nonzero = np.diff(_prefix_sums((h > 0).astype(np.float64))[edges], axis=1)
    return totals, nonzero


def _prefix_sums(x: np.ndarray) -> np.ndarray:
    """``s[k] = sum(x[:k])`` for ``k`` in ``0..len(x)``."""
    return np.concatenate(([0.0], np.cumsum(x)))


def _suffix_sums(x: np.ndarray) -> np.ndarray:
    """``s[k] = sum(x[k:])`` for ``k`` in ``0..len(x)``."""
    return np.concatenate((np.cumsum(x[::-1])[::-1], [0.0]))


def _xlogx(x: np.ndarray) -> np.ndarray:
    return _xlogy(x, x)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x log y``, 0 where ``x`` is 0."""
    x, y = np.broadcast_arrays(x, y)
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _histogram(stats: TensorStatistics) -> np.ndarray:
    if stats.histogram is None:
        raise ValueError("this range method needs statistics collected with histogram=True")
    return stats.histogram


def _levels(stats: TensorStatistics) -> int:
    return 128 if stats.minimum < 0 else 256


def _clipped(stats: TensorStatistics, threshold: float) -> tuple[float, float]:
    return max(stats.minimum, -threshold), min(stats.maximum, threshold)


RangeFunction = Callable[[TensorStatistics, RangeOptions], tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class CalibrationMethod:
    """A way of choosing a tensor's range from its statistics."""

    name: str
    needs_histogram: bool
    summary: str
    range: RangeFunction
    reads_percentile: bool = False
    """It reads the ``percentile`` option (which any other method would ignore)."""


METHODS: dict[str, CalibrationMethod] = {
    method.name: method
    for method in (
        CalibrationMethod("minmax", False, "the smallest and largest value seen", minmax_range),
        CalibrationMethod(
            "percentile",
            True,
            "clip |x| at a percentile (default 99.999)",
            percentile_range,
            reads_percentile=True,
        ),
        CalibrationMethod(
            "entropy", True, "clip |x| where KL to the quantized histogram is least", entropy_range
        ),
        CalibrationMethod(
            "mse", True, "clip |x| where the expected squared error is least", mse_range
        ),
    )
}


def tensor_range(
    stats: TensorStatistics, method: str, *, percentile: float = 99.999
) -> tuple[float, float]:
    """The range ``(lo, hi)`` that ``method`` chooses from ``stats``; ``(0, 0)`` when no finite
    element was seen."""
    if method not in METHODS:
        raise CalibrationError(
            f"unknown calibration method '{method}'; choose one of: {', '.join(METHODS)}"
        )
    options = RangeOptions(percentile)
    if stats.count == 0:
        return 0.0, 0.0
    lo, hi = METHODS[method].range(stats, options)
    return float(lo), float(hi)


def dominated(stats: TensorStatistics, scale: float) -> bool:
    """Whether a few values dominate the range that gave ``scale`` (see the module doc)."""
    nonzero = stats.count - stats.zeros
    if nonzero == 0:
        return False
    histogram = _histogram(stats).astype(np.float64)
    histogram[0] -= stats.zeros
    counts = np.cumsum(histogram)
    bulk = int(np.searchsorted(counts, DOMINANCE_PERCENTILE * nonzero / 100.0)) + 1
    zeroed_bins = min(int(scale / 2 / stats.bin_width), HISTOGRAM_BINS)
    zeroed = counts[zeroed_bins - 1] if zeroed_bins > 0 else 0.0
    far = stats.absmax > DOMINANCE_RATIO * bulk * stats.bin_width
    return far and zeroed > ZEROED_SHARE * nonzero


def estimated_sqnr_db(stats: TensorStatistics, lo: float, hi: float, scale: float) -> float:
    """Expected signal-to-quantization-noise ratio (dB) of quantizing the tensor with step
    ``scale`` over ``[lo, hi]``, from its ``|x|`` histogram (elements at their bin centers ``c``):
    ``sum h c^2 / (sum_{c <= T} h scale^2 / 12 + sum_{c > T} h (c - T)^2)``, ``T = max(-lo, hi)``.
    """
    histogram = _histogram(stats).astype(np.float64)
    centers = (np.arange(HISTOGRAM_BINS) + 0.5) * stats.bin_width
    threshold = max(-lo, hi)
    clipped = centers > threshold
    noise = histogram[~clipped].sum() * scale**2 / 12
    noise += (histogram[clipped] * (centers[clipped] - threshold) ** 2).sum()
    signal = (histogram * centers**2).sum()
    return sqnr_db(signal, noise)


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``, the energies' ratio in decibels: inf for no noise, -inf
    for no signal."""
    if noise == 0.0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


# Collection


class Accumulator(Protocol):
    """Anything that keeps a running summary of one tensor over calibration batches."""

    def update(self, x: np.ndarray) -> None: ...


A = TypeVar("A", bound=Accumulator)


class Accumulators:
    """Several accumulators of one tensor, fed together (one calibration run for all)."""

    def __init__(self, parts: Iterable[Accumulator]) -> None:
        self.parts = list(parts)

    def update(self, x: np.ndarray) -> None:
        for part in self.parts:
            part.update(x)


def collect_statistics(
    model: ir.Model,
    tensors: Mapping[str, bool],
    data: DataSource,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, TensorStatistics]:
    """``TensorStatistics`` of the named values of ``model.graph`` over every batch of ``data``;
    ``tensors`` maps each value's name to whether it needs a histogram (see ``collect``)."""
    statistics = {name: TensorStatistics(histogram=wanted) for name, wanted in tensors.items()}
    return collect(model, statistics, data, progress=progress)


def collect(
    model: ir.Model,
    accumulators: Mapping[str, A],
    data: DataSource,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> Mapping[str, A]:
    """Feed each named value of ``model.graph``, batch by batch over ``data``, to its accumulator.

    Graph inputs are read from the feeds; other values are made graph outputs for the session
    only (``model`` is left as it was). ``progress`` is told ``(batches done, batches in all or
    None)`` after each batch. Returns ``accumulators``.
    """
    graph = model.graph
    values = _named_values(graph, accumulators)
    computed = [v for v in values.values() if not v.is_graph_input()]
    sess = _session_reading(model, [v for v in computed if not v.is_graph_output()])
    names = [v.name for v in computed]
    files = batch_files(data) if isinstance(data, (str, os.PathLike)) else None
    total = None if files is None else len(files)
    done = 0
    for done, feeds in enumerate(read_batches(data, input_specs(graph)), start=1):
        _check_feeds(graph, feeds, _batch_label(done, files))
        _update(accumulators, _run(sess, names, feeds), values, feeds)
        if progress is not None:
            progress(done, total)
    if done == 0:
        raise CalibrationError("the calibration data holds no batches")
    return accumulators


def _named_values(graph: ir.Graph, names: Iterable[str]) -> dict[str, ir.Value]:
    """The values of ``graph`` (inputs and node outputs) called ``names``."""
    values = {value.name: value for value in graph.inputs}
    values.update((value.name, value) for node in graph for value in node.outputs)
    found = {}
    for name in names:
        if name in values:
            found[name] = values[name]
        elif name in graph.initializers:
            raise CalibrationError(
                f"tensor '{name}' is an initializer: its range comes from its values, "
                "not from calibration"
            )
        else:
            raise CalibrationError(f"tensor '{name}' is not a value of the model's graph")
    return found


def _session_reading(model: ir.Model, extra_outputs: Sequence[ir.Value]) -> ort.InferenceSession:
    """A session of ``model`` with ``extra_outputs`` among its outputs, on every core and with
    onnxruntime's optimizations (a requested output is never fused away)."""
    with _temporary_outputs(model.graph, extra_outputs):
        return session(model, optimize=True, threads=CALIBRATION_THREADS)


@contextlib.contextmanager
def _temporary_outputs(graph: ir.Graph, values: Sequence[ir.Value]) -> Iterator[None]:
    """``values`` appended to the graph's outputs, then popped off again.

    Popping (not ``del outputs[k:]``, which onnx_ir does not track) keeps each value's
    graph-output mark right.
    """
    original = list(graph.outputs)
    graph.outputs.extend(values)
    try:
        yield
    finally:
        for _ in values:
            graph.outputs.pop()
        if list(graph.outputs) != original:
            raise RuntimeError("bug: calibration did not restore the graph's outputs")


def _update(
    accumulators: Mapping[str, Accumulator],
    results: dict[str, np.ndarray],
    values: Mapping[str, ir.Value],
    feeds: Feeds,
) -> None:
    """Add one batch to ``accumulators``. A function of its own so that the batch's outputs are
    freed before the next batch runs (a loop variable would hold them through that run)."""
    for name, accumulator in accumulators.items():
        accumulator.update(results[name] if name in results else _input_array(values[name], feeds))


def _run(sess: ort.InferenceSession, names: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """The outputs called ``names`` (none: onnxruntime would run them all for an empty list)."""
    return dict(zip(names, sess.run(names, feeds), strict=True)) if names else {}


def _input_array(value: ir.Value, feeds: Feeds) -> np.ndarray:
    """A graph input's array in this batch: fed, or else its initializer default."""
    if value.name in feeds:
        return feeds[value.name]
    return value.const_value.numpy()


def _batch_label(number: int, files: Sequence[Path] | None, kind: str = "calibration batch") -> str:
    label = f"{kind} {number}"
    return label if files is None else f"{label} ({files[number - 1].name})"


def checked_batches(graphs: Sequence[ir.Graph], data: DataSource, kind: str) -> Iterator[Feeds]:
    """The batches of ``data``, each checked as calibration checks its own against the inputs
    of every graph (names, dtype, shape, no empty or non-finite array): a misfit is one line
    naming the batch (``kind`` and number, and file) and the input. For ``eval`` and
    ``debug``, whose data feeds two models."""
    files = batch_files(data) if isinstance(data, (str, os.PathLike)) else None
    for number, feeds in enumerate(read_batches(data, input_specs(graphs[0])), start=1):
        for graph in graphs:
            _check_feeds(graph, feeds, _batch_label(number, files, kind))
        yield feeds


def _check_feeds(graph: ir.Graph, feeds: Feeds, label: str) -> None:
    """Raise if ``feeds`` do not fit the graph's inputs: one line naming batch and input."""
    inputs = {value.name: value for value in graph.inputs}
    for name in feeds:
        if name not in inputs:
            raise CalibrationError(
                f"{label}: '{name}' is not an input of the model (its inputs: {_names(inputs)})"
            )
    for name, value in inputs.items():
        if name in feeds:
            _check_array(value, feeds[name], label)
        elif value.const_value is None:
            raise CalibrationError(
                f"{label}: input '{name}' is missing (the batch has: {_names(feeds)})"
            )
    _check_not_empty(feeds, label)


def _check_array(value: ir.Value, array: np.ndarray, label: str) -> None:
    for check in _ARRAY_CHECKS:
        problem = check(value, array)
        if problem is not None:
            raise CalibrationError(f"{label}, input '{value.name}': {problem}")


def _dtype_problem(value: ir.Value, array: np.ndarray) -> str | None:
    if value.dtype is None or array.dtype == value.dtype.numpy():
        return None
    return f"dtype {array.dtype}, expected {value.dtype.numpy()}"


def _shape_problem(value: ir.Value, array: np.ndarray) -> str | None:
    shape = value.shape
    if shape is None:
        return None
    fits = len(shape) == array.ndim and all(
        dim == size for dim, size in zip(shape, array.shape, strict=True) if isinstance(dim, int)
    )
    return None if fits else f"shape {list(array.shape)}, expected {shape}"


def _check_not_empty(feeds: Feeds, label: str) -> None:
    """A batch of zero samples (every array empty) would calibrate nothing, and leave default
    scales behind. One empty array among others is an empty dimension the model takes: a
    decoder's KV cache before its first token ([batch, heads, 0, head size]) at prefill."""
    empty = [name for name, array in feeds.items() if np.asarray(array).size == 0]
    if empty and len(empty) == len(feeds):
        shape = list(np.shape(feeds[empty[0]]))
        raise CalibrationError(f"{label}, input '{empty[0]}': holds no values (shape {shape})")


def _finiteness_problem(value: ir.Value, array: np.ndarray) -> str | None:
    if value.dtype is None or not value.dtype.is_floating_point():
        return None
    if np.isnan(array).any():
        return "holds NaN"
    if np.isinf(array).any():
        return "holds inf"
    return None


_ARRAY_CHECKS: tuple[Callable[[ir.Value, np.ndarray], str | None], ...] = (
    _dtype_problem,
    _shape_problem,
    _finiteness_problem,
)


def _names(names: Mapping[str, object]) -> str:
    return ", ".join(f"'{name}'" for name in names) or "nothing"


# Random data


def random_batches(model: ir.Model, count: int, *, seed: int = 0) -> Iterator[Feeds]:
    """``count`` batches of random feeds for the graph's inputs (those without a default).

    A dynamic dimension takes the size its reader's weight asks for where the input feeds a
    weighted op directly (``_required_sizes``), else 1; floats are standard normal, integers
    uniform in ``[0, RANDOM_INTEGER_LIMIT)``, booleans fair coins. Only for trying the
    pipeline: ranges from random data say nothing about real inputs.
    """
    rng = np.random.default_rng(seed)
    inputs = [value for value in model.graph.inputs if value.const_value is None]
    for _ in range(count):
        yield {value.name: _random_array(value, rng) for value in inputs}


def _required_sizes(value: ir.Value) -> dict[int, int]:
    """Axis -> the size a weighted reader of ``value`` needs there: a MatMul's or Gemm's
    reduction length, a Conv's input channels."""
    sizes: dict[int, int] = {}
    rank = len(value.shape or ())
    for node, index in value.uses():
        weight = node.inputs[1].const_value if index == 0 and len(node.inputs) > 1 else None
        if weight is None:
            continue
        dims = weight.shape
        if node.op_type == "MatMul" and len(dims) >= 2:
            sizes[rank - 1] = dims[-2]
        elif node.op_type == "Gemm" and len(dims) == 2:
            trans_b = node.attributes.get_int("transB", 0)
            sizes[0 if node.attributes.get_int("transA", 0) else 1] = dims[1 if trans_b else 0]
        elif node.op_type == "Conv" and len(dims) >= 2:
            sizes[1] = dims[1] * node.attributes.get_int("group", 1)
    return sizes


def _random_array(value: ir.Value, rng: np.random.Generator) -> np.ndarray:
    dtype = value.dtype
    if dtype is None or value.shape is None:
        raise CalibrationError(f"input '{value.name}' has no known type and shape")
    required = _required_sizes(value)
    shape = tuple(
        dim if isinstance(dim, int) else required.get(axis, 1)
        for axis, dim in enumerate(value.shape)
    )
    if dtype.is_floating_point():
        array = rng.standard_normal(shape)
    elif dtype.is_integer():
        array = rng.integers(0, RANDOM_INTEGER_LIMIT, shape)
    elif dtype == ir.DataType.BOOL:
        array = rng.integers(0, 2, shape)
    else:
        raise CalibrationError(f"input '{value.name}': no random data for type {dtype.name}")
    return array.astype(dtype.numpy())
