"""Smoothing scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, and the search for alpha.

A channel where either maximum is 0 keeps ``s_j = 1``: it carries nothing to balance.

The search (``alpha = auto``) scores each candidate ``s`` by the output SQNR of the tensor's
quantized readers, ``10 log10(sum ||X W||^2 / sum ||Q_a(X / s) Q_w(diag(s) W) - X W||^2)``,
summed over readers, on a sample of calibration rows. ``Q_w`` quantizes to the reader's weight
spec (per channel, from the weight's own min/max); ``Q_a`` to the activation spec over the
min/max of ``X / s``, ``[min_j(lo_j / s_j), max_j(hi_j / s_j)]`` from per-channel minima
``lo`` and maxima ``hi`` of the other calibration rows (``ChannelStatistics``: even rows fit
the range, odd rows are sampled). Fitting the range on rows the sample is not among lets
the search see some of the clipping new data meets; it still favours large alphas, whose
``X / s`` has every channel's maximum at the range's edge (on the reference decoder it chose
1.0 everywhere, 5 dB worse on the held-out set than a fixed 0.5: the calibration maxima
understate new data's). The search ranks scales by min/max calibration; it does not predict
the final calibration method's error. Candidates: every alpha of ``ALPHA_GRID`` and no
smoothing at all, so by its own score no tensor ends worse than it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qgraph.passes.smoothquant.readers import ReaderProduct
from qgraph.quant.calibration import ChannelStatistics, sqnr_db
from qgraph.quant.spec import (
    QuantSpec,
    dequantize,
    fake_quantize_weight,
    quantize,
    scale_and_zero_point,
)

ALPHA_GRID = tuple(round(0.1 * step, 1) for step in range(11))


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s = x_max^alpha / w_max^(1 - alpha)`` (float64), 1 where either maximum is 0."""
    live = (x_max > 0) & (w_max > 0)
    x = np.where(live, x_max, 1.0).astype(np.float64)
    w = np.where(live, w_max, 1.0).astype(np.float64)
    return np.where(live, x**alpha / w ** (1.0 - alpha), 1.0)


@dataclasses.dataclass(frozen=True)
class QuantizedReader:
    """One reader in the search: its product form, float weight and weight spec."""

    product: ReaderProduct
    weight: np.ndarray
    weight_spec: QuantSpec


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen alpha (None: no smoothing) and the readers' output SQNR without and with it."""

    alpha: float | None
    sqnr_unsmoothed: float
    sqnr_chosen: float


class AlphaSearch:
    """Scores smoothing scales for one tensor against its readers' float outputs."""

    def __init__(
        self,
        stats: ChannelStatistics,
        readers: list[QuantizedReader],
        activation_spec: QuantSpec,
    ) -> None:
        self.stats = stats
        self.readers = readers
        self.activation_spec = activation_spec
        self.references = [r.product.rows @ r.product.to_matrix(r.weight) for r in readers]
        self.signal = sum(float(np.square(ref, dtype=np.float64).sum()) for ref in self.references)

    def best(self, w_max: np.ndarray) -> SearchResult:
        """The alpha (or none) whose scale gives the highest output SQNR."""
        unsmoothed = self.sqnr(np.ones_like(w_max, dtype=np.float64))
        chosen, best = None, unsmoothed
        for alpha in ALPHA_GRID:
            sqnr = self.sqnr(smoothing_scale(self.stats.absmax, w_max, alpha))
            if sqnr > best:
                chosen, best = alpha, sqnr
        return SearchResult(chosen, unsmoothed, best)

    def sqnr(self, scale: np.ndarray) -> float:
        """Output SQNR (dB) of the readers with activations ``X / s`` and weights ``diag(s) W``."""
        lo = float(np.min(self.stats.fitted_minimum / scale))
        hi = float(np.max(self.stats.fitted_maximum / scale))
        a_scale, a_zero = scale_and_zero_point(lo, hi, self.activation_spec)
        noise = 0.0
        for reader, reference in zip(self.readers, self.references, strict=True):
            product = reader.product
            rows = product.rows / scale[product.channels].astype(np.float32)
            rows = dequantize(
                quantize(rows, a_scale, a_zero, self.activation_spec), a_scale, a_zero
            )
            weight = fake_quantize_weight(
                _scaled(reader.weight, scale, product.weight_axis), reader.weight_spec
            )
            noise += float(
                np.square(rows @ product.to_matrix(weight) - reference, dtype=np.float64).sum()
            )
        return sqnr_db(self.signal, noise)


def _scaled(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (weight * scale.reshape(shape)).astype(np.float32)
