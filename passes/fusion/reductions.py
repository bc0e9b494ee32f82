"""A max over axes of an activation is the activation of the extremes.

For ``f`` nondecreasing, ``max_S f(y) = f(max_S y)``. For ``f`` quasiconvex on the reals
(nonincreasing up to its minimum, nondecreasing after it: GELU, HardSwish), every ``y`` in
``[min_S y, max_S y]`` has ``f(y) <= max(f(min_S y), f(max_S y))``, so
``max_S f(y) = max(f(max_S y), f(min_S y))``. A constant ``c`` that is the same along the
reduced axes does not move the extremes: ``max_S (y + c) = max_S y + c``, and so for ``min``.
So, with ``a`` the reduced axes (every spatial axis for ``GlobalMaxPool``), ``R`` one of
``GlobalMaxPool`` or ``ReduceMax`` over ``a``::

    R(f(y [+ c])) -> f(ReduceMax(y, a) [+ c'])                                  f nondecreasing
    R(f(y [+ c])) -> Max(f(ReduceMax(y, a) [+ c']), f(ReduceMin(y, a) [+ c']))  f quasiconvex

(``c'`` is ``c`` without the reduced axes where the reduction drops them). ``f`` and the
bias then run on the reduced tensor, not on every element. Rounding is monotone, so the
bias moves exactly; ``f`` is evaluated at the same float32 extremes, so outputs are equal bit
for bit wherever ``f``'s kernel keeps its monotony in float32 (onnxruntime's do on magika).
magika's Conv output takes a bias and a GELU before a max over its 508 positions; after this
rule both run on 512 values a sample.
"""

from __future__ import annotations

import enum

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    model_opset,
    not_a_candidate,
    reduction_axes,
)

AXES_AS_INPUT_OPSET = 18
"""From this opset on, ReduceMax and ReduceMin take their axes as an input."""


class Monotony(enum.Enum):
    NONDECREASING = enum.auto()
    QUASICONVEX = enum.auto()
    """Nonincreasing, then nondecreasing: the max of a set is at its max or its min."""


ACTIVATIONS: dict[tuple[str, str], Monotony] = {
    ("", "Relu"): Monotony.NONDECREASING,
    ("", "Sigmoid"): Monotony.NONDECREASING,
    ("", "Tanh"): Monotony.NONDECREASING,
    ("", "Softplus"): Monotony.NONDECREASING,
    ("", "Gelu"): Monotony.QUASICONVEX,
    ("", "HardSwish"): Monotony.QUASICONVEX,
    (MICROSOFT_DOMAIN, "Gelu"): Monotony.QUASICONVEX,
    (MICROSOFT_DOMAIN, "FastGelu"): Monotony.QUASICONVEX,
}
"""Elementwise ops of one input (none with attributes that change their shape) and their
monotony. GELU's tanh approximation is quasiconvex too: one minimum, near -0.75."""

REDUCTIONS = ("GlobalMaxPool", "ReduceMax")


class _MaxOfActivation(TargetRule):
    """``max over a of f(y)`` -> ``f`` of the extremes of ``y`` (module docstring)."""

    activation: tuple[str, str] = ("", "")
    reduction = ""
    biased = False

    def pattern(self, op, y):
        return self._reduced(op, y)

    def _reduced(self, op, source):
        domain, op_type = self.activation
        activated = getattr(op, op_type)(
            source, _domain=domain, _allow_other_attributes=True, _outputs=["activated"]
        )
        return getattr(op, self.reduction)(
            activated, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"]
        )

    def check(self, context, y, activated, out, c=None, **_) -> MatchResult:
        if y.dtype not in FLOAT_TYPES or y.shape is None:
            return not_a_candidate()
        reduce = out.producer()
        axes, problem = _reduced_axes(reduce, len(y.shape))
        if problem is None and self.biased:
            self._bias, problem = _bias_for(c, y, axes, _keeps_dims(reduce))
        if problem:
            return fail(problem, reduce)
        self._axes, self._keepdims = axes, _keeps_dims(reduce)
        self._opset = model_opset(context)
        return MatchResult()

    def rewrite(self, op, y, activated, out, c=None, **_):
        node = activated.producer()
        bias = fresh_weight(op, c, self._bias, "reduced") if self.biased else None

        def activation_of(kind: str) -> ir.Value:
            extreme = _reduce(op, kind, y, self._axes, self._keepdims, self._opset)
            if bias is not None:
                extreme = op.Add(extreme, bias)
            return getattr(op, node.op_type)(extreme, _domain=node.domain, **node.attributes)

        largest = activation_of("ReduceMax")
        if ACTIVATIONS[self.activation] is Monotony.NONDECREASING:
            return largest
        return op.Max(largest, activation_of("ReduceMin"))


class _MaxOfBiasedActivation(_MaxOfActivation):
    """``max over a of f(y + c)`` -> ``f`` of the extremes of ``y``, plus ``c``."""

    biased = True

    def pattern(self, op, y, c):
        return self._reduced(op, op.Add(y, c))


def _keeps_dims(reduce: ir.Node) -> bool:
    return reduce.op_type == "GlobalMaxPool" or reduce.attributes.get_int("keepdims", 1) == 1


def _reduced_axes(reduce: ir.Node, rank: int) -> tuple[tuple[int, ...], str | None]:
    """(the axes ``reduce`` takes the max over, nonnegative; why they are not known)."""
    if reduce.op_type == "GlobalMaxPool":
        return tuple(range(2, rank)), None if rank > 2 else "it has no spatial axes"
    axes = reduction_axes(reduce)
    if axes is None:
        return (), f"its axes '{reduce.inputs[1].name}' are not a constant"
    if not axes:
        if reduce.attributes.get_int("noop_with_empty_axes", 0):
            return (), "it reduces nothing (noop_with_empty_axes)"
        return tuple(range(rank)), None
    return tuple(sorted(a % rank for a in axes)), None


def _bias_for(
    c: ir.Value, y: ir.Value, axes: tuple[int, ...], keepdims: bool
) -> tuple[np.ndarray | None, str | None]:
    """(``c`` as added to the reduced tensor, or None; why it cannot be moved past the max)."""
    array = constant(c)
    rank = len(y.shape)
    if array is None:
        return None, f"the added '{c.name}' is not a constant"
    if array.ndim > rank:
        return None, f"the added '{c.name}' has more axes than the activation's input"
    full = array.reshape((1,) * (rank - array.ndim) + array.shape)
    for axis, size in enumerate(full.shape):
        if size != 1 and (axis in axes or size != y.shape[axis]):
            return None, f"the added '{c.name}' varies along a reduced or broadcast axis"
    return (full if keepdims else full.squeeze(axis=axes)), None


def _reduce(
    op, kind: str, x: ir.Value, axes: tuple[int, ...], keepdims: bool, opset: int
) -> ir.Value:
    """``kind`` (ReduceMax or ReduceMin) of ``x`` over ``axes``, in the model's opset form."""
    if opset >= AXES_AS_INPUT_OPSET:
        return getattr(op, kind)(x, op.Constant(value_ints=list(axes)), keepdims=int(keepdims))
    return getattr(op, kind)(x, axes=list(axes), keepdims=int(keepdims))


def _rule(activation: tuple[str, str], reduction: str, biased: bool) -> type[_MaxOfActivation]:
    domain, op_type = activation
    name = f"MaxOf{op_type}{'Ms' if domain else ''}{'Biased' if biased else ''}{reduction}"
    fields = {
        "activation": activation,
        "reduction": reduction,
        "root_ops": frozenset({reduction}),
        "required_ops": frozenset({op_type}),
    }
    return type(name, (_MaxOfBiasedActivation if biased else _MaxOfActivation,), fields)


RULES = tuple(
    _rule(activation, reduction, biased)
    for biased in (True, False)
    for activation in ACTIVATIONS
    for reduction in REDUCTIONS
)
"""One rule per activation, reduction, and with or without a constant added first (biased
first, so that a bias moves with the activation)."""
