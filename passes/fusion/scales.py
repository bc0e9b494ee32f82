"""Constant scales folded into the weights next to them; Transpose and Reshape chains collapsed.

MatMul with weights W [K, N] (x [..., K]):

- after:  ``(x W) * c  = x (W diag(c))``, c a scalar or [N]: ``W'[:, n] = c[n] W[:, n]``
- before: ``(x * c) W  = x (diag(c) W)``, c a scalar or [K]: ``W'[k, :] = c[k] W[k, :]``

Conv with weights W [C_out, C_in / group, ...] and bias b:

- after:  ``Conv(x) * c``, c a scalar or per output channel: ``W'[o] = c[o] W[o]``, ``b' = c b``
- before: ``Conv(x * c)``, c a scalar or per input channel (group 1; zero padding stays zero):
  ``W'[:, i] = c[i] W[:, i]``

``/ c`` is ``* (1 / c)`` (c with no zero). c may carry leading 1s but must not widen the result.

Layout chains: ``Transpose(Transpose(x, p), q) = Transpose(x, p o q)`` (nothing when the
composition is the identity); ``Reshape(Reshape(x, s), t) = Reshape(x, t)`` when t is a
constant without 0 entries (a 0 would copy a dimension of the intermediate shape).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.passes.fusion.rules import (
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    not_a_candidate,
    weight_problem,
)


def _per_axis(
    c: np.ndarray, size: int | None, rank: int | None, axis_from_end: int
) -> np.ndarray | None:
    """c as a vector over one axis (counted from the end), or None if it scales anything else."""
    if rank is not None and c.ndim > rank:
        return None
    if c.size == 1:
        return np.full(size, c.reshape(-1)[0]) if isinstance(size, int) else None
    dims = list(c.shape)
    if len(dims) < axis_from_end or dims[-axis_from_end] != size:
        return None
    others = dims[: len(dims) - axis_from_end] + dims[len(dims) - axis_from_end + 1 :]
    return c.reshape(-1) if all(d == 1 for d in others) else None


def _scale(c_value: ir.Value, divide: bool) -> np.ndarray | None:
    c = constant(c_value)
    if c is None or (divide and np.any(c == 0)):
        return None
    return 1.0 / c.astype(np.float64) if divide else c.astype(np.float64)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


class _ScaleRule(TargetRule):
    divide = False

    def _vector(self, c, size, rank, axis_from_end, where) -> np.ndarray | MatchResult:
        if constant(c) is None:
            return not_a_candidate()
        scale = _scale(c, self.divide)
        if scale is None:
            return fail(f"divisor '{c.name}' has zeros", c)
        vector = _per_axis(scale, size, rank, axis_from_end)
        if vector is None:
            return fail(f"'{c.name}' of shape {list(scale.shape)} does not scale only {where}", c)
        return vector

    def _check_matmul(self, w, c, product, size_axis: int, rank: int, where: str) -> MatchResult:
        """Check a 2-D constant MatMul weight and a scale along its axis ``size_axis``; keep
        the scale vector for ``rewrite``."""
        if constant(w) is None:
            return not_a_candidate()
        problem = weight_problem(w, product.producer())
        if problem is not None or _rank(w) != 2:
            return fail(problem or f"weight '{w.name}' is not 2-D", w)
        vector = self._vector(c, w.shape[size_axis], rank, 1, where)
        if isinstance(vector, MatchResult):
            return vector
        self._vector_value = vector
        return MatchResult()


class ScaleAfterMatMul(_ScaleRule):
    """``MatMul(x, W) * c`` (or ``/ c``) -> ``MatMul(x, W')``."""

    root_ops = frozenset({"Mul"})

    def pattern(self, op, x, w, c):
        product = op.MatMul(x, w, _outputs=["product"])
        return op.Div(product, c) if self.divide else op.Mul(product, c)

    def check(self, context, x, w, c, product, **_) -> MatchResult:
        return self._check_matmul(w, c, product, 1, _rank(product), "the output columns")

    def rewrite(self, op, x, w, **_):
        folded = constant(w).astype(np.float64) * self._vector_value[None, :]
        return op.MatMul(x, fresh_weight(op, w, folded, "scaled"))


class ScaleBeforeMatMul(_ScaleRule):
    """``MatMul(x * c, W)`` (or ``x / c``) -> ``MatMul(x, W')``."""

    root_ops = frozenset({"MatMul"})

    def pattern(self, op, x, w, c):
        scaled = op.Div(x, c) if self.divide else op.Mul(x, c)
        return op.MatMul(scaled, w, _outputs=["product"])

    def check(self, context, x, w, c, product, **_) -> MatchResult:
        return self._check_matmul(w, c, product, 0, _rank(x), "the input channels")

    def rewrite(self, op, x, w, **_):
        folded = self._vector_value[:, None] * constant(w).astype(np.float64)
        return op.MatMul(x, fresh_weight(op, w, folded, "scaled"))


class ScaleAfterConv(_ScaleRule):
    """``Conv(x, W, b) * c`` (or ``/ c``) -> ``Conv(x, W', b')``."""

    root_ops = frozenset({"Mul"})

    def pattern(self, op, x, w, c):
        out = op.Conv(x, w, _allow_other_inputs=True, _outputs=["out"])
        return op.Div(out, c) if self.divide else op.Mul(out, c)

    def check(self, context, x, w, c, out, **_) -> MatchResult:
        conv = out.producer()
        problem = weight_problem(w, conv)
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if problem is None and bias is not None and constant(bias) is None:
            problem = f"bias '{bias.name}' is not a constant"
        if problem is not None:
            return fail(problem, conv)
        rank = _rank(out)
        axis_from_end = rank - 1 if rank is not None else None
        if axis_from_end is None:
            return fail("the Conv output's rank is unknown", out)
        vector = self._vector(c, constant(w).shape[0], rank, axis_from_end, "output channels")
        if isinstance(vector, MatchResult):
            return vector
        self._vector_value = vector
        return MatchResult()

    def rewrite(self, op, x, w, out, **_):
        conv = out.producer()
        weights = constant(w).astype(np.float64)
        folded = weights * self._vector_value.reshape(-1, *([1] * (weights.ndim - 1)))
        inputs = [x, fresh_weight(op, w, folded, "scaled")]
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = constant(conv.inputs[2]).astype(np.float64) * self._vector_value
            inputs.append(fresh_weight(op, conv.inputs[2], bias, "scaled"))
        return op.Conv(*inputs, **conv.attributes)


class ScaleBeforeConv(_ScaleRule):
    """``Conv(x * c, W, b)`` (or ``x / c``) -> ``Conv(x, W', b)``, group 1."""

    root_ops = frozenset({"Conv"})

    def pattern(self, op, x, w, c):
        scaled = op.Div(x, c) if self.divide else op.Mul(x, c)
        return op.Conv(scaled, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, w, c, out, **_) -> MatchResult:
        conv = out.producer()
        problem = weight_problem(w, conv)
        if problem is not None:
            return fail(problem, conv)
        if conv.attributes.get_int("group", 1) != 1:
            return fail("grouped Conv: input channels do not map to one weight slice", conv)
        rank = _rank(x)
        if rank is None:
            return fail("the Conv input's rank is unknown", x)
        vector = self._vector(c, constant(w).shape[1], rank, rank - 1, "input channels")
        if isinstance(vector, MatchResult):
            return vector
        self._vector_value = vector
        return MatchResult()

    def rewrite(self, op, x, w, out, **_):
        conv = out.producer()
        weights = constant(w).astype(np.float64)
        folded = weights * self._vector_value.reshape(1, -1, *([1] * (weights.ndim - 2)))
        return op.Conv(
            x, fresh_weight(op, w, folded, "scaled"), *conv.inputs[2:], **conv.attributes
        )


def _division(rule: type[_ScaleRule]) -> type[_ScaleRule]:
    """The same rule for ``/ c``; a rule rooted at the Mul is then rooted at the Div."""
    roots = frozenset({"Div"}) if rule.root_ops == {"Mul"} else rule.root_ops
    name = rule.__name__.replace("Scale", "Division")
    return type(name, (rule,), {"divide": True, "root_ops": roots})


DivisionAfterMatMul = _division(ScaleAfterMatMul)
DivisionBeforeMatMul = _division(ScaleBeforeMatMul)
DivisionAfterConv = _division(ScaleAfterConv)
DivisionBeforeConv = _division(ScaleBeforeConv)


class TransposeTranspose(TargetRule):
    """``Transpose(Transpose(x, p), q)`` -> ``Transpose(x, p o q)`` or ``x``."""

    root_ops = frozenset({"Transpose"})

    def pattern(self, op, x, first, second):
        return op.Transpose(op.Transpose(x, perm=first), perm=second)

    def check(self, context, x, first, second, **_) -> MatchResult:
        if first is None or second is None:
            return fail("a Transpose has no explicit perm", x)
        return MatchResult()

    def rewrite(self, op, x, first, second, **_):
        p, q = first.as_ints(), second.as_ints()
        composed = [p[i] for i in q]
        if composed == sorted(composed):
            return op.Identity(x)
        return op.Transpose(x, perm=composed)


class ReshapeReshape(TargetRule):
    """``Reshape(Reshape(x, s), t)`` -> ``Reshape(x, t)`` for constant t without 0 entries."""

    root_ops = frozenset({"Reshape"})

    def pattern(self, op, x, first, second):
        inner = op.Reshape(x, first, _allow_other_attributes=True)
        return op.Reshape(inner, second, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, first, second, out, **_) -> MatchResult:
        shape = constant(second)
        if shape is None:
            return fail("the second shape is not a constant", second)
        if np.any(shape == 0) and not out.producer().attributes.get_int("allowzero", 0):
            return fail("the second shape copies a dimension (0) of the intermediate shape", second)
        return MatchResult()

    def rewrite(self, op, x, second, out, **_):
        return op.Reshape(x, second, **out.producer().attributes)
