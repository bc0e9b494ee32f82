"""Lowering: Q/DQ groups rewritten to the integer operators of the target's runtime.

A Q/DQ model states the arithmetic (``DQ(q) = (q - z) s`` around float ops); a QOperator model
names the kernels that do it. This pass (lower phase) turns the first into the second when the
compile asks for the QOperator format, with the rules the target's runtime has kernels for
(``TargetSpec.lowering_rules``). Rules are tried in table order, so a group whose output is
quantized becomes one ``QLinear*`` op before the op alone can become a float-output one. The
math of each rule is in its module: ``weighted`` (Conv, MatMul, Gemm) and ``nbits`` (4-bit
weight-only MatMul, and the bias of an 8-bit one).

One lowering runs in either format: ``lower-16-bit`` (``digits``) writes an op reading a 16-bit
activation as two 8-bit digit products on a target whose runtime has no 16-bit kernels but
does have those products (``ActivationScheme.int16_digits``); left in Q/DQ form it would run
in float.

onnxruntime fuses the Q/DQ form into the same kernels itself when its graph optimizations are
on (level extended or above), so the QOperator format is for runtimes and sessions that do not.
"""

from __future__ import annotations

import dataclasses
import functools

import onnx_ir as ir
import onnx_ir.passes.common as common
from rich.console import RenderableType

from qgraph.errors import QGraphError
from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.lowering import digits, elementwise, nbits, weighted
from qgraph.passes.rule_table import (
    CompiledTable,
    NearMiss,
    TableRule,
    apply_rules,
    compile_table,
    near_misses,
)
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.recipe import Mode
from qgraph.sections import rule_tables
from qgraph.targets import QuantFormat, TargetSpec


class LoweringUnavailableError(QGraphError):
    """The QOperator format was asked of a target whose runtime has no QOperator kernels."""


def _runs(name: str):
    return lambda target: name in target.lowering_rules


RULES = tuple(
    TableRule(name, summary, classes, wanted=_runs(name))
    for name, summary, classes in (
        (
            "qlinear-conv",
            "Q([Relu](Conv(DQ(x), DQ(w), DQ(b)))) -> QLinearConv",
            (weighted.QLinearConvLowering, weighted.QLinearConvReluLowering),
        ),
        (
            "qlinear-matmul",
            "Q([Relu](MatMul(DQ(a), DQ(w)))) -> QLinearMatMul",
            (weighted.QLinearMatMulLowering, weighted.QLinearMatMulReluLowering),
        ),
        *elementwise.TABLE,
        ("qgemm", "Gemm(DQ(a), DQ(w), DQ(c)) -> QGemm", (weighted.GemmToQGemm,)),
        (
            "matmul-integer-to-float",
            "MatMul(DQ(a), DQ(w)) -> MatMulIntegerToFloat",
            (weighted.MatMulToMatMulIntegerToFloat,),
        ),
        (
            "conv-integer",
            "Conv(DQ(x), DQ(w), b) -> ConvInteger * s_x s_w + b",
            (weighted.ConvToConvInteger,),
        ),
        (
            "matmul-nbits",
            "MatMul(a, DQ(4-bit w in blocks)) -> MatMulNBits",
            (nbits.MatMulToMatMulNBits,),
        ),
        (
            "weight-only-bias-sum",
            "Add(MatMul(a, DQ(8-bit w)), bias) -> Sum, which onnxruntime keeps from a float Gemm",
            (nbits.BiasAsSum,),
        ),
    )
)
RULE_NAMES = tuple(rule.name for rule in RULES)
DIGIT_RULES = (
    TableRule(
        "sixteen-bit-digits",
        "op(DQ16(x), DQ(w)) -> two MatMulIntegerToFloat over x's 8-bit digits",
        (digits.DigitMatMul, digits.DigitGemm, digits.DigitConv),
        wanted=lambda target: target.activations.int16_digits,
    ),
)


@dataclasses.dataclass(frozen=True)
class LoweringReport:
    """What the lower pass did: rewrites per rule, and near-misses when explaining."""

    applied: dict[str, int]
    near_misses: tuple[NearMiss, ...]

    def explanation(self, pass_name: str) -> list[RenderableType]:
        """Rewrites per rule, and the near-misses by reason."""
        return rule_tables(pass_name, self.applied, self.near_misses)


@functools.cache
def compiled_rules(target: TargetSpec) -> CompiledTable:
    return compile_table(RULES, target)


class _RulePass(ir.passes.InPlacePass):
    """Apply a compiled rule table until it changes nothing."""

    def __init__(self, rules: CompiledTable, *, explain: bool = False) -> None:
        super().__init__()
        self.rules = rules
        self.explain = explain

    def call(self, model: ir.Model) -> ReportingPassResult:
        had_domain = MICROSOFT_DOMAIN in model.opset_imports
        model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        applied = apply_rules(model, self.rules)
        if any(applied.values()):
            common.RemoveUnusedNodesPass()(model)
        elif not had_domain:
            del model.opset_imports[MICROSOFT_DOMAIN]
        misses = near_misses(model, self.rules) if self.explain else ()
        return ReportingPassResult(model, any(applied.values()), LoweringReport(applied, misses))


class LowerPass(_RulePass):
    """Rewrite Q/DQ groups to the target runtime's integer operators."""

    def __init__(self, target: TargetSpec, *, explain: bool = False) -> None:
        if not target.lowering_rules:
            raise LoweringUnavailableError(
                f"target {target.name} has no QOperator kernels; its runtime reads Q/DQ only "
                "(drop --format qoperator)"
            )
        super().__init__(compiled_rules(target), explain=explain)


class DigitLoweringPass(_RulePass):
    """Rewrite ops reading a 16-bit activation to two 8-bit digit products."""

    def __init__(self, target: TargetSpec, *, explain: bool = False) -> None:
        super().__init__(compile_table(DIGIT_RULES, target), explain=explain)


def _build(ctx) -> LowerPass | None:
    quantization = ctx.options.quantization
    if quantization is None:
        return None
    by_mode = {
        Mode.DYNAMIC: ctx.target.dynamic_format,
        Mode.WEIGHT_ONLY: ctx.target.weight_only_format,
    }
    requested = ctx.options.format or by_mode.get(quantization.mode, ctx.target.format)
    if requested is not QuantFormat.QOPERATOR:
        return None
    return LowerPass(ctx.target, explain=ctx.options.explain)


def _build_digits(ctx) -> DigitLoweringPass | None:
    if ctx.options.quantization is None or not ctx.target.activations.int16_digits:
        return None
    return DigitLoweringPass(ctx.target, explain=ctx.options.explain)


BUILDERS: dict[str, PassBuilder] = {
    "lower-16-bit": _build_digits,
    "lower": _build,
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
