"""GELU written out, recognized as one op.

- erf form:  ``gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2)))``   (or ``x * (1 / sqrt(2))``)
- tanh form: ``gelu(x) = x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))``

The product is accepted as ``(x * 0.5) * (1 + ...)`` or ``x * ((1 + ...) * 0.5)``, in any
operand order; the cubic term as ``x^3 * 0.044715`` (``Pow`` or ``x * x * x``) or as
``x * (x * (0.044715 x))`` (jax2tf's order, magika's). Each constant must equal its value to
float32 rounding and be one element of a rank no higher than ``x``'s, so that ``Gelu(x)``
has the shape the product had. It becomes
``Gelu(x, approximate="none" | "tanh")`` from opset 20, else onnxruntime's com.microsoft
``Gelu`` / ``FastGelu`` where the target runs that domain, else it stays as it is.
"""

from __future__ import annotations

import enum
import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    close_to,
    fail,
    model_opset,
    scalar,
)

GELU_OPSET = 20
SQRT2 = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


class _GeluFusion(TargetRule):
    approximate = "none"
    contrib_op = "Gelu"
    half_first = True
    """Which product form: ``(x * 0.5) * (1 + ...)`` or ``x * ((1 + ...) * 0.5)``."""

    root_ops = frozenset({"Mul"})

    def _times_half(self, op, x, plus, half):
        if self.half_first:
            return op.Mul(op.Mul(x, half), plus)
        return op.Mul(x, op.Mul(plus, half))

    def _common_problem(self, context, x, *constants) -> str | None:
        if x.dtype not in FLOAT_TYPES:
            return f"{x.dtype} is not a float type"
        half, one = constants[:2]
        if not (close_to(scalar(half), 0.5) and close_to(scalar(one), 1.0)):
            return "the constants are not 0.5 and 1"
        if any(_widens(constant, x) for constant in constants):
            return "a constant has more dimensions than x, so the product broadcasts x"
        if (
            model_opset(context) < GELU_OPSET
            and MICROSOFT_DOMAIN not in self.target.runtime.allowed_domains
        ):
            return (
                f"opset {model_opset(context)} has no Gelu (from 20) and target "
                f"{self.target.name} does not run {MICROSOFT_DOMAIN}"
            )
        self._standard = model_opset(context) >= GELU_OPSET
        return None

    def rewrite(self, op, x, **_):
        if self._standard:
            return op.Gelu(x, approximate=self.approximate)
        return getattr(op, self.contrib_op)(x, _domain=MICROSOFT_DOMAIN)


class GeluErfFusion(_GeluFusion):
    """``x * 0.5 * (1 + Erf(x / sqrt 2))`` -> ``Gelu(x)``."""

    required_ops = frozenset({"Erf"})

    def pattern(self, op, x, root, half, one):
        scaled = pattern.OrValue([op.Div(x, root), op.Mul(x, root)], tag_var="scaling")
        return self._times_half(op, x, op.Add(op.Erf(scaled), one), half)

    def check(self, context, x, root, half, one, scaling=None, **_) -> MatchResult:
        expected = SQRT2 if scaling == 0 else 1.0 / SQRT2
        if not close_to(scalar(root), expected):
            return fail("the Erf argument is not x / sqrt(2)", x)
        problem = self._common_problem(context, x, half, one, root)
        return MatchResult() if problem is None else fail(problem, x)


class CubeForm(enum.Enum):
    """How an exporter writes ``0.044715 x^3``."""

    POWER = "Pow(x, 3) * c"
    PRODUCT = "(x * (x * x)) * c"
    NESTED = "x * (x * (x * c))"  # jax2tf


class GeluTanhFusion(_GeluFusion):
    """``x * 0.5 * (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` -> ``Gelu(x, "tanh")``.

    One rule per ``cube`` form rather than one with alternatives: onnxscript tries every
    operand order of every Add and Mul in a pattern, alternatives included, so one rule for the
    three forms had 4096 orders and took 23 of DenseNet's 33 compile seconds.
    """

    approximate = "tanh"
    contrib_op = "FastGelu"
    cube = CubeForm.POWER
    required_ops = frozenset({"Tanh"})

    def pattern(self, op, x, three, cubic, scale, half, one):
        cubic_term = {
            CubeForm.POWER: lambda: op.Mul(op.Pow(x, three), cubic),
            CubeForm.PRODUCT: lambda: op.Mul(op.Mul(x, op.Mul(x, x)), cubic),
            CubeForm.NESTED: lambda: op.Mul(x, op.Mul(x, op.Mul(x, cubic))),
        }[self.cube]()
        inner = op.Mul(op.Add(x, cubic_term), scale)
        return self._times_half(op, x, op.Add(op.Tanh(inner), one), half)

    def check(self, context, x, cubic, scale, half, one, three=None, **_):
        if self.cube is CubeForm.POWER and scalar(three) != 3.0:
            return fail("the power is not 3", x)
        if not (close_to(scalar(cubic), CUBIC) and close_to(scalar(scale), TANH_SCALE)):
            return fail("the constants are not 0.044715 and sqrt(2/pi)", x)
        power = (three,) if self.cube is CubeForm.POWER else ()
        problem = self._common_problem(context, x, half, one, cubic, scale, *power)
        return MatchResult() if problem is None else fail(problem, x)


TANH_RULES = tuple(
    type(
        f"GeluTanh{form.name.title()}{'' if half_first else 'HalfLast'}",
        (GeluTanhFusion,),
        {"cube": form, "half_first": half_first},
    )
    for form in CubeForm
    for half_first in (True, False)
)
"""``GeluTanhFusion`` for each cube form, with the half first or last."""


class GeluErfHalfLast(GeluErfFusion):
    """``x * ((1 + Erf(x / sqrt 2)) * 0.5)`` -> ``Gelu(x)``."""

    half_first = False


def _widens(constant: ir.Value, x: ir.Value) -> bool:
    """Whether broadcasting ``constant`` against ``x`` could add dimensions to ``x``."""
    rank = len(constant.shape) if constant.shape is not None else None
    if rank == 0:
        return False
    return rank is None or x.shape is None or rank > len(x.shape)
