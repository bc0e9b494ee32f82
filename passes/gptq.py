"""GPTQ: round a weight to its quantization grid so that the layer's output, not the weight,
stays close (Frantar et al., arXiv 2210.17323).

A layer ``y = x W`` with ``W`` of ``K`` inputs by ``N`` outputs is quantized to ``W'``; over the
calibration inputs ``X`` (rows are samples) the output error is

    E = ||X W - X W'||^2 = sum over outputs n of (w_n - w'_n)^T H (w_n - w'_n),   H = X^T X

so each output's weights ``w_n`` (a row of ``W^T``) meet the same quadratic form. GPTQ rounds
the inputs one at a time, in order ``k = 0 .. K-1``: round ``w_k`` to the grid, then move the
not yet rounded ``w_{k+1..}`` to absorb its error, the least-squares optimum given ``w_k``:

    e = (w_k - w'_k) / U_kk,     w_j <- w_j - e U_kj   for j > k

where ``U`` is the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``); its row ``k`` is
the inverse Hessian restricted to the inputs after ``k``, which is what makes one factorization
serve every step. With ``H = c I`` there is nothing to absorb (``U`` is diagonal) and GPTQ is
round-to-nearest.

The grid follows the weight's ``QuantSpec`` and is fixed before any input is rounded, from the
weight as given: per block of ``g`` inputs, from the block's searched range (below); per
channel, from each output's min/max; per tensor, from the whole weight's. ``H`` gets a damping
of ``DAMPING`` times its mean diagonal (inputs that were never nonzero get a diagonal of 1 and
weights of 0, since they never reach the output). Columns are processed ``LAZY_COLUMNS`` at a
time, the paper's lazy batch update: the same arithmetic, with most of it in matrix products.

Order. Per-block weights are rounded in order of decreasing ``H_kk`` (the paper's "act-order"):
the inputs that carry the most signal are rounded first, while the most weights are left to
absorb their error. A block's inputs are then no longer rounded together, which is why its grid
is fixed up front ("static groups") rather than when its first input is reached. On SmolLM2's
decoder with blocks of 128 it took the perplexity ratio over FP32 from 1.186 to 1.119 (int4)
and from 1.118 to 1.099 (uint4). Per-channel and per-tensor weights keep the natural order.

A block's range is searched. Its 16 levels (4 bits) spent on its min/max round every input
coarsely to keep one or two extremes exact; the range ``[r lo, r hi]`` clips those and rounds
the rest on a finer step. Each block takes the ``r`` in ``CLIP_RATIOS`` whose rounding error
``sum_k H_kk (w_k - w'_k)^2`` is least: ``H_kk (w_k - w'_k)^2`` is the output error of rounding
input ``k`` alone, before the updates absorb part of it. On SmolLM2's decoder, in input order
with each block's grid set when it was reached, it took the perplexity ratio over FP32 from
1.179 to 1.124 (int4, blocks of 32) and from 1.208 to 1.125 (uint4, blocks of 64). Only GPTQ
searches: without ``H``, the same search weighting every input alike made round-to-nearest
worse (int4 MatMuls, blocks of 32: 1.357 -> 1.392; a uint4 embedding table: 1.118 -> 1.141),
since it clips whichever values are rare, important or not.
"""

from __future__ import annotations

import numpy as np

from qgraph.quant.spec import (
    INTEGER_DTYPES,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    quantize,
    scale_and_zero_point,
)

DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal: keeps the Cholesky factorization
of a near-singular H (few samples, correlated inputs) stable; the paper's value."""
LAZY_COLUMNS = 128
"""Inputs rounded between two updates of the rest of the weight."""
CLIP_RATIOS = np.linspace(1.0, 0.7, 16)
"""The shrinks of a block's min/max range that ``searched_range`` tries, 1 (min/max) first."""


class InputGram:
    """The running ``X^T X`` of a layer's input over calibration batches (an accumulator for
    ``qgraph.quant.calibration.collect``); ``X`` is the input with every axis but the last
    flattened."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1])
        product = (rows.T @ rows).astype(np.float64)
        self.gram = product if self.gram is None else self.gram + product
        self.rows += rows.shape[0]


def gptq_quantize(
    weight: np.ndarray, gram: np.ndarray, spec: QuantSpec, reduction_axis: int
) -> QuantizedTensor:
    """``weight`` (2-D, ``K`` inputs along ``reduction_axis``) quantized to ``spec`` by GPTQ
    with ``gram = X^T X`` of its input; the result has ``quantize_weight``'s layout."""
    if spec.block_size is not None and spec.axis % 2 != reduction_axis:
        raise ValueError("GPTQ blocks run along the weight's inputs")
    rows = weight.T if reduction_axis == 0 else weight  # [N outputs, K inputs]
    values, scale, zero_point = _round_columns(rows.astype(np.float64), gram, spec)
    if spec.block_size is None:  # one group: per channel [N], or per tensor (a scalar)
        scale, zero_point = scale[:, 0], zero_point[:, 0]
        if spec.axis is None:
            scale, zero_point = scale[0, ...], zero_point[0, ...]
    elif reduction_axis == 0:
        scale, zero_point = scale.T, zero_point.T
    values = values.T if reduction_axis == 0 else values
    return QuantizedTensor(np.ascontiguousarray(values), scale, zero_point)


def _round_columns(
    rows: np.ndarray, gram: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ over the columns of ``rows`` [N, K]: the integers [N, K], and the scales and zero
    points [N, groups] (one group of ``K`` for per-channel and per-tensor specs)."""
    inputs = rows.shape[1]
    order = rounding_order(gram, spec)
    permuted = rows[:, order]
    factor = _inverse_cholesky(gram[np.ix_(order, order)], permuted)
    given = np.empty_like(permuted)
    given[:, order] = permuted
    scales, zero_points = _grids(given, np.diag(gram), spec)
    group_of = order // (spec.block_size or inputs)
    values = np.zeros(rows.shape, np.int64)
    for start in range(0, inputs, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, inputs)
        block = permuted[:, start:stop].copy()
        errors = np.zeros(block.shape)
        for i in range(stop - start):
            column = start + i
            scale = scales[:, group_of[column]].astype(np.float64)
            zero_point = zero_points[:, group_of[column]]
            q = quantize(block[:, i], scale, zero_point, spec)
            rounded = (q.astype(np.float64) - zero_point) * scale
            values[:, order[column]] = q
            errors[:, i] = (block[:, i] - rounded) / factor[column, column]
            block[:, i + 1 :] -= np.outer(errors[:, i], factor[column, column + 1 : stop])
        permuted[:, stop:] -= errors @ factor[start:stop, stop:]
    dtype = INTEGER_DTYPES[spec.dtype]
    return values.astype(dtype), scales, zero_points.astype(dtype)


def rounding_order(gram: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The order GPTQ rounds the inputs in: decreasing ``H_kk`` for per-block weights (ties in
    input order), the natural order otherwise."""
    if spec.block_size is None:
        return np.arange(gram.shape[0])
    return np.argsort(-np.diag(gram), kind="stable")


def _grids(
    rows: np.ndarray, importance: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's scale and zero point [N, groups] from the weight as given ``rows`` [N, K]:
    the whole weight's min/max, each channel's, or each block's searched range."""
    count, inputs = rows.shape
    if spec.axis is None:
        scale, zero_point = scale_and_zero_point(rows.min(), rows.max(), spec)
        return np.full((count, 1), scale), np.full((count, 1), zero_point)
    if spec.block_size is None:
        scale, zero_point = scale_and_zero_point(rows.min(1), rows.max(1), spec)
        return scale[:, None], zero_point[:, None]
    starts = range(0, inputs, spec.block_size)
    found = [
        searched_range(rows[:, s : s + spec.block_size], importance[s : s + spec.block_size], spec)
        for s in starts
    ]
    return np.stack([f[0] for f in found], 1), np.stack([f[1] for f in found], 1)


def searched_range(
    rows: np.ndarray, importance: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of ``rows`` [N, g] (a block of each output): those of
    the range ``[r lo, r hi]``, ``r`` in ``CLIP_RATIOS``, with the least rounding error, each
    input ``k`` weighted by ``importance[k]``."""
    lo, hi = rows.min(1), rows.max(1)

    def error(scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        grid = scale[:, None], zero_point[:, None]
        rounded = dequantize(quantize(rows, *grid, spec), *grid).astype(np.float64)
        return (rows - rounded) ** 2 @ importance

    scale, zero_point = scale_and_zero_point(lo, hi, spec)
    least = error(scale, zero_point)
    for ratio in CLIP_RATIOS[1:]:
        trial_scale, trial_zero_point = scale_and_zero_point(lo * ratio, hi * ratio, spec)
        trial = error(trial_scale, trial_zero_point)
        better = trial < least
        scale = np.where(better, trial_scale, scale)
        zero_point = np.where(better, trial_zero_point, zero_point)
        least = np.minimum(trial, least)
    return scale, zero_point


def _inverse_cholesky(gram: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damping)^{-1}``; zeroes ``rows``' columns for dead inputs."""
    hessian = np.array(gram, np.float64)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    rows[:, dead] = 0.0
    hessian[np.diag_indices_from(hessian)] += DAMPING * np.mean(np.diag(hessian))
    inverse = np.linalg.inv(hessian)
    return np.linalg.cholesky((inverse + inverse.T) / 2).T
