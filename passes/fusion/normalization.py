"""Decomposed LayerNorm and RMSNorm recognized as the single ops they are.

LayerNorm over the last axis, as exporters write it out::

    mean = ReduceMean(x); d = x - mean; var = ReduceMean(d^2)      (d^2 as Pow(d, 2) or d * d)
    y = d / Sqrt(var + eps) * gamma  [+ beta]        (or d * Reciprocal(Sqrt(..)), d * (1 / Sqrt))
      -> LayerNormalization(x, gamma[, beta], axis=-1, epsilon=eps)          (opset >= 17,
                                               or earlier where the target's runtime adds it)

LayerNorm from its moments over any one axis ``a``, as jax2tf writes flax's (magika's, over
positions)::

    m = ReduceSum(x, a) * (1/n); v = Max(0, ReduceSum(x * x, a) * (1/n) - m * m)
    y = (x - B(m)) * (Reciprocal(Sqrt(B(v) + eps)) * gamma) + beta
      -> Transpose(LayerNormalization(Transpose(x, a last), gamma, beta, axis=-1), back)

where ``B`` is a Reshape then an Expand putting the statistics back as axis ``a`` of size 1
(checked on the inferred shapes) and ``gamma`` and ``beta`` vary along ``a`` at most. The
moments form loses digits to cancellation where the variance is small beside the squared
mean; LayerNormalization subtracts the mean first, so the rewrite computes the same function
a little more exactly (it differs by the original's own rounding, relative
``~ eps32 E[x^2] / (v + eps)`` in the scale). Two transposes and one kernel cost less than the
moments' six passes over ``x`` in onnxruntime (magika: 10 ms less a batch of 64, one thread).

RMSNorm (Llama) over the last axis::

    y = x / Sqrt(ReduceMean(x^2) + eps) * gamma      (or x * Reciprocal(Sqrt(..)), x * (1 / Sqrt))
      -> RMSNormalization(x, gamma, axis=-1, epsilon=eps)                    (opset >= 23)
      -> SimplifiedLayerNormalization(x, gamma, ...) where the target's runtime adds it

Both ReduceMeans must reduce exactly the last axis with ``keepdims`` (the ``axes`` attribute
before opset 18, an input from 18 on), ``eps`` must be a constant scalar and ``gamma`` (and
``beta``) must have the shape of that last axis: anything else is not this op. A last axis of
size 1 stays decomposed: onnxruntime (1.22) refuses to normalize a single value. The norms are
matched before constant scales fold into MatMul weights, so a gamma stays with its norm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    close_to,
    constant,
    fail,
    fresh_weight,
    model_opset,
    reduction_axes,
    scalar,
)

LAYER_NORM = "LayerNormalization"
LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23
RUNTIME_RMS_NORM = "SimplifiedLayerNormalization"


def _mean(op, x, name: str):
    return op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=[name])


def _square(op, x, two):
    return pattern.OrValue([op.Pow(x, two), op.Mul(x, x)])


def _divided_by(op, numerator, denominator, one):
    return pattern.OrValue(
        [
            op.Div(numerator, denominator),
            op.Mul(numerator, op.Reciprocal(denominator)),
            op.Mul(numerator, op.Div(one, denominator)),
        ],
        tag_var="division",  # onnxscript 0.7 cannot clone a backtracking OrValue without one
        tag_values=("div", "reciprocal", "one-over"),
    )


def _reduces_last_axis(mean: ir.Value, rank: int | None) -> bool:
    node = mean.producer()
    if node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = reduction_axes(node)
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or axes[0] == (rank or 0) - 1)


def _normalization_problem(x, means, eps, two, gamma, one=None) -> str | None:
    rank = None if x.shape is None else len(x.shape)
    if x.dtype not in FLOAT_TYPES:
        return f"{x.dtype} is not a float type"
    if x.shape is not None and x.shape[-1] == 1:
        return "it normalizes a single value, which onnxruntime's normalization ops refuse"
    if not all(_reduces_last_axis(m, rank) for m in means):
        return "a ReduceMean does not reduce exactly the last axis with keepdims"
    if two is not None and scalar(two) != 2.0:
        return "the power is not 2"
    if one is not None and scalar(one) != 1.0:
        return "the reciprocal's numerator is not 1"
    if scalar(eps) is None:
        return f"epsilon '{eps.name}' is not a constant scalar"
    return _vector_problem(gamma, x, "scale")


def _vector_problem(vector: ir.Value, x: ir.Value, role: str) -> str | None:
    """Why ``vector`` is not a [D] vector for the last axis D of ``x`` (None if it is)."""
    if vector.shape is None:
        return f"the {role}'s shape is unknown"
    dims = [d for d in vector.shape if d != 1]
    if len(dims) > 1 or len(vector.shape) > (len(x.shape) if x.shape is not None else 1):
        return f"the {role} of shape {vector.shape} is not one value per channel"
    if x.shape is not None and dims and dims[0] != x.shape[-1]:
        return f"the {role} does not match the last axis of {x.shape}"
    if len(vector.shape) != 1 and constant(vector) is None:
        return f"the {role} of shape {vector.shape} is not a constant to reshape"
    return None


def _as_vector(op, vector: ir.Value, x: ir.Value) -> ir.Value:
    """``vector`` as shape [D] (a constant's leading ones dropped)."""
    if vector.shape is not None and len(vector.shape) == 1:
        return vector
    array = constant(vector).reshape(-1)
    if array.size == 1 and x.shape is not None and isinstance(x.shape[-1], int):
        array = np.repeat(array, x.shape[-1])
    return fresh_weight(op, vector, array, "vector")


class LayerNormFusion(TargetRule):
    """Decomposed LayerNorm -> ``LayerNormalization(x, gamma)``."""

    root_ops = frozenset({"Mul"})
    required_ops = frozenset({"ReduceMean", "Sqrt"})

    def pattern(self, op, x, two, eps, gamma, one):
        deviation = op.Sub(x, _mean(op, x, "mean"))
        variance = _mean(op, _square(op, deviation, two), "variance")
        normalized = _divided_by(op, deviation, op.Sqrt(op.Add(variance, eps)), one)
        return op.Mul(normalized, gamma)

    def check(self, context, x, mean, variance, eps, gamma, two=None, one=None, **_) -> MatchResult:
        opset = model_opset(context)
        added = LAYER_NORM in self.target.runtime.default_domain_extensions
        if opset < LAYER_NORM_OPSET and not added:
            return fail(
                f"opset {opset} has no LayerNormalization (from 17) and target "
                f"{self.target.name} does not add it",
                x,
            )
        problem = _normalization_problem(x, (mean, variance), eps, two, gamma, one)
        return MatchResult() if problem is None else fail(problem, x)

    def rewrite(self, op, x, eps, gamma, **_):
        return op.LayerNormalization(x, _as_vector(op, gamma, x), axis=-1, epsilon=scalar(eps))


class LayerNormBiasFusion(TargetRule):
    """``LayerNormalization(x, gamma) + beta`` -> ``LayerNormalization(x, gamma, beta)``."""

    root_ops = frozenset({"Add"})

    def pattern(self, op, x, gamma, beta):
        return op.Add(op.LayerNormalization(x, gamma, _outputs=["normalized"]), beta)

    def check(self, context, x, normalized, beta, **_) -> MatchResult:
        layer_norm = normalized.producer()
        if len(layer_norm.outputs) > 1:
            return fail("LayerNormalization also returns its statistics", normalized)
        axis = layer_norm.attributes.get_int("axis", -1)
        if axis != -1 and (x.shape is None or axis != len(x.shape) - 1):
            return fail("LayerNormalization does not normalize the last axis", normalized)
        problem = _vector_problem(beta, x, "bias")
        return MatchResult() if problem is None else fail(problem, beta)

    def rewrite(self, op, x, gamma, beta, normalized, **_):
        attributes = normalized.producer().attributes
        return op.LayerNormalization(x, gamma, _as_vector(op, beta, x), **attributes)


class MomentsLayerNormFusion(TargetRule):
    """LayerNorm from its moments over one axis -> ``LayerNormalization``, transposed to put
    that axis last (module docstring)."""

    root_ops = frozenset({"Add"})
    required_ops = frozenset({"ReduceSum", "Sqrt", "Expand"})

    def pattern(self, op, x, inv_count, floor, eps, gamma, beta, shapes):
        mean = op.Mul(_sum(op, x, "sum"), inv_count)
        mean_square = op.Mul(_sum(op, op.Mul(x, x), "sum_of_squares"), inv_count)
        variance = op.Max(floor, op.Sub(mean_square, op.Mul(mean, mean)))
        spread = _broadcast(op, variance, shapes, "spread")
        inverse_std = op.Reciprocal(op.Sqrt(op.Add(spread, eps)))
        centered = op.Sub(x, _broadcast(op, mean, shapes, "centre"))
        return op.Add(op.Mul(centered, op.Mul(inverse_std, gamma)), beta)

    def check(self, context, x, inv_count, floor, eps, gamma, beta, **values) -> MatchResult:
        if x.dtype not in FLOAT_TYPES or x.shape is None:
            return fail("the input's type or shape is unknown", x)
        axis = _summed_axis(values["sum"].producer(), values["sum_of_squares"].producer())
        if axis is None:
            return fail("the sums do not reduce one and the same constant axis", x)
        axis %= len(x.shape)
        problem = self._problem(context, x, axis, inv_count, floor, eps, values)
        if problem is None:
            problem = _along_axis_problem(gamma, x, axis) or _along_axis_problem(beta, x, axis)
        if problem:
            return fail(problem, x)
        self._axis = axis
        return MatchResult()

    def _problem(self, context, x, axis, inv_count, floor, eps, values) -> str | None:
        if model_opset(context) < LAYER_NORM_OPSET and (
            LAYER_NORM not in self.target.runtime.default_domain_extensions
        ):
            return f"opset {model_opset(context)} has no LayerNormalization (from 17)"
        size = x.shape[axis]
        if not isinstance(size, int) or not close_to(scalar(inv_count), 1.0 / size):
            return f"the sums are not divided by the axis size {size}"
        if scalar(floor) != 0.0 or scalar(eps) is None:
            return "the variance is not floored at 0, or epsilon is not a constant scalar"
        kept = [1 if a == axis else d for a, d in enumerate(x.shape)]
        for name in ("spread", "centre"):
            shape = values[name].shape
            if shape is None or list(shape) != kept:
                return f"the statistics are not broadcast back as axis {axis}"
        return None

    def rewrite(self, op, x, eps, gamma, beta, **_):
        rank, axis = len(x.shape), self._axis
        size = x.shape[axis]
        gamma, beta = (_along_axis(op, v, size) for v in (gamma, beta))
        epsilon = scalar(eps)
        if axis == rank - 1:
            return op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=epsilon)
        order = [a for a in range(rank) if a != axis] + [axis]
        moved = op.Transpose(x, perm=order)
        normalized = op.LayerNormalization(moved, gamma, beta, axis=-1, epsilon=epsilon)
        return op.Transpose(normalized, perm=np.argsort(order).tolist())


def _sum(op, x, name: str):
    return op.ReduceSum(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=[name])


def _broadcast(op, statistics, shapes, name: str):
    return op.Expand(op.Reshape(statistics, shapes), shapes, _outputs=[name])


def _summed_axis(*sums: ir.Node) -> int | None:
    """The one constant axis both ReduceSums reduce, else None."""
    found = set()
    for node in sums:
        axes = reduction_axes(node)
        if axes is None or len(axes) != 1:
            return None
        found.add(axes[0])
    return found.pop() if len(found) == 1 else None


def _along_axis_problem(vector: ir.Value, x: ir.Value, axis: int) -> str | None:
    """Why ``vector`` is not a constant that varies along ``axis`` of ``x`` at most."""
    array = constant(vector)
    rank = len(x.shape)
    if array is None or array.ndim > rank:
        return f"'{vector.name}' is not a constant of rank {rank} or less"
    full = array.reshape((1,) * (rank - array.ndim) + array.shape)
    if any(d != 1 for a, d in enumerate(full.shape) if a != axis):
        return f"'{vector.name}' varies along another axis than the normalized one"
    return None


def _along_axis(op, vector: ir.Value, size: int) -> ir.Value:
    """``vector`` as shape ``[size]``."""
    array = np.broadcast_to(constant(vector).reshape(-1), (size,))
    return fresh_weight(op, vector, array, "vector")


class RMSNormFusion(TargetRule):
    """Decomposed RMSNorm -> ``RMSNormalization`` or the runtime's RMSNorm op."""

    root_ops = frozenset({"Mul"})
    required_ops = frozenset({"ReduceMean", "Sqrt"})

    def pattern(self, op, x, two, eps, gamma, one):
        mean_square = _mean(op, _square(op, x, two), "mean_square")
        return op.Mul(_divided_by(op, x, op.Sqrt(op.Add(mean_square, eps)), one), gamma)

    def check(self, context, x, mean_square, eps, gamma, two=None, one=None, **_) -> MatchResult:
        self._op_type = self._available_op(model_opset(context))
        if self._op_type is None:
            return fail(
                f"opset {model_opset(context)} has no RMSNormalization (from 23) and target "
                f"{self.target.name} adds no {RUNTIME_RMS_NORM}",
                x,
            )
        problem = _normalization_problem(x, (mean_square,), eps, two, gamma, one)
        return MatchResult() if problem is None else fail(problem, x)

    def _available_op(self, opset: int) -> str | None:
        if opset >= RMS_NORM_OPSET and self.target.runtime.max_opset >= RMS_NORM_OPSET:
            return "RMSNormalization"
        if RUNTIME_RMS_NORM in self.target.runtime.default_domain_extensions:
            return RUNTIME_RMS_NORM
        return None

    def rewrite(self, op, x, eps, gamma, **_):
        build = getattr(op, self._op_type)
        return build(x, _as_vector(op, gamma, x), axis=-1, epsilon=scalar(eps))
