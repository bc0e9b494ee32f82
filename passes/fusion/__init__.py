"""Fusion: float-equivalent rewrites that give exported graphs the shape quantization expects.

One pass (``fusion``, float-rewrites phase) runs the rules below in this order, round after
round until a round changes nothing, then records activations (see ``activations``). Each rule
module states its math:

- ``scales``: Transpose/Reshape chains collapsed; constant Mul/Div next to a MatMul or Conv
  folded into its weights
- ``onehot``: a one-hot vector times a constant matrix to a row lookup (Gather)
- ``batchnorm``: BatchNormalization folded into Conv / ConvTranspose / Gemm / MatMul
- ``normalization``: decomposed LayerNorm and RMSNorm to single ops
- ``gelu``: GELU (erf and tanh forms) to Gelu
- ``tables``: an elementwise op on rows looked up from a constant table folded into the table
- ``activations``: ``x * HardSigmoid(x)`` to HardSwish; activations after weighted ops recorded
- ``reductions``: a max over axes of a monotone or quasiconvex activation (and a bias before
  it) to the activation of the extremes
- ``gemm``: 2-D MatMul + Add to Gemm, or Gemm to MatMul + Add, as the target prefers

A second pass (``runtime-fusion``, after SmoothQuant and rotation, which find norms and
attention heads as the exporter wrote them) runs, where the target wants them, the graph
rewrites of ``GRAPH_REWRITES`` (matched by walking the graph: they replace
values that are read on):

- ``attention``: a decoder's attention over its KV cache (rotary embedding, cache Concat,
  grouped heads, softmax) to one GroupQueryAttention
- ``residual``: a residual Add and the RMSNorm after it to SkipSimplifiedLayerNormalization;
  a residual Add before a LayerNorm to Sum, where the runtime would fuse the two into a slower
  kernel (that rewrite is the target's ``slower_fusions``, not its contrib ops)

A third (``pack-projections``, the last float rewrite, weight-only mode) packs the MatMuls
that read one activation into one MatMul and a Split (``packing``).

Every rule keeps the function: outputs equal the original's to float32 rounding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_ir as ir
import onnx_ir.passes.common as common
from rich.console import RenderableType

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.graph.traversal import all_nodes
from qgraph.passes.annotate import reads_float_activations
from qgraph.passes.canonicalize import IdentityEliminationPass
from qgraph.passes.fusion import (
    activations,
    attention,
    batchnorm,
    gelu,
    gemm,
    normalization,
    onehot,
    packing,
    reductions,
    residual,
    scales,
    tables,
)
from qgraph.passes.rule_table import (
    CompiledTable,
    NearMiss,
    TableRule,
    apply_rules,
    compile_table,
    label,
    near_misses,
)
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.recipe import Mode, QuantOptions
from qgraph.sections import rule_tables
from qgraph.targets import TargetSpec

if TYPE_CHECKING:
    from qgraph.registry import PassContext

RULES = (
    TableRule(
        "transpose-chain", "Transpose(Transpose(x)) -> one or none", (scales.TransposeTranspose,)
    ),
    TableRule(
        "reshape-chain", "Reshape(Reshape(x, s), t) -> Reshape(x, t)", (scales.ReshapeReshape,)
    ),
    TableRule(
        "one-hot-to-gather",
        "MatMul(one-hot(ids), W) -> Gather(W, ids)",
        (onehot.OneHotMatMulToGather,),
    ),
    TableRule(
        "fold-batchnorm",
        "BatchNormalization into Conv/ConvTranspose/Gemm/MatMul",
        (batchnorm.FoldBatchNorm,),
    ),
    TableRule(
        "layer-norm", "decomposed LayerNorm -> LayerNormalization", (normalization.LayerNormFusion,)
    ),
    TableRule(
        "moments-layer-norm",
        "LayerNorm from E[x^2] - E[x]^2 over one axis -> LayerNormalization (axis moved last)",
        (normalization.MomentsLayerNormFusion,),
    ),
    TableRule(
        "layer-norm-bias",
        "LayerNormalization + beta -> LayerNormalization(.., beta)",
        (normalization.LayerNormBiasFusion,),
    ),
    TableRule(
        "rms-norm",
        "decomposed RMSNorm -> RMSNormalization / SimplifiedLayerNormalization",
        (normalization.RMSNormFusion,),
    ),
    TableRule(
        "scale-after-matmul",
        "MatMul(x, W) * c or / c -> MatMul(x, W')",
        (scales.ScaleAfterMatMul, scales.DivisionAfterMatMul),
    ),
    TableRule(
        "scale-before-matmul",
        "MatMul(x * c or x / c, W) -> MatMul(x, W')",
        (scales.ScaleBeforeMatMul, scales.DivisionBeforeMatMul),
    ),
    TableRule(
        "scale-after-conv",
        "Conv(x, W, b) * c or / c -> Conv(x, W', b')",
        (scales.ScaleAfterConv, scales.DivisionAfterConv),
    ),
    TableRule(
        "scale-before-conv",
        "Conv(x * c or x / c, W) -> Conv(x, W')",
        (scales.ScaleBeforeConv, scales.DivisionBeforeConv),
    ),
    TableRule(
        "gelu-erf",
        "x * 0.5 * (1 + erf(x / sqrt 2)) -> Gelu",
        (gelu.GeluErfFusion, gelu.GeluErfHalfLast),
    ),
    TableRule(
        "gelu-tanh",
        "tanh-approximated GELU -> Gelu(approximate=tanh) / FastGelu",
        gelu.TANH_RULES,
    ),
    TableRule(
        "table-fold",
        "f(Gather(T, ids)[, c]) -> Gather(f(T[, c]), ids) for an elementwise f",
        tables.RULES,
    ),
    TableRule("hard-swish", "x * HardSigmoid(x) -> HardSwish", (activations.HardSwishFusion,)),
    TableRule(
        "max-of-activation",
        "max over axes of f(y [+ c]) -> f of y's extremes [+ c] for a monotone or quasiconvex f",
        reductions.RULES,
    ),
    TableRule(
        "matmul-add-to-gemm",
        "2-D MatMul + Add -> Gemm",
        (gemm.MatMulAddToGemm,),
        wanted=lambda target: target.kernels.matmul_add_as_gemm,
    ),
    TableRule(
        "gemm-to-matmul-add",
        "Gemm -> MatMul + Add",
        (gemm.GemmToMatMulAdd,),
        wanted=lambda target: not target.kernels.matmul_add_as_gemm,
    ),
)
ACTIVATION_RULE = "activation"


@dataclasses.dataclass(frozen=True)
class GraphRewrite:
    """A fusion matched by walking the graph rather than by an onnxscript pattern."""

    name: str
    summary: str
    wanted: Callable[[TargetSpec], bool]
    apply: Callable[[ir.Model], tuple[int, tuple[NearMiss, ...]]]
    """Rewrites the model's graph; (rewrites, near-misses with reasons)."""


GRAPH_REWRITES = (
    GraphRewrite(
        attention.RULE_NAME, attention.SUMMARY, attention.wanted, attention.fuse_attention
    ),
    GraphRewrite(residual.RULE_NAME, residual.SUMMARY, residual.wanted, residual.fuse_skip_norms),
    GraphRewrite(
        residual.UNFUSED_RULE,
        residual.UNFUSED_SUMMARY,
        residual.keeps_layer_norms_unfused,
        residual.unfuse_layer_norms,
    ),
)


@dataclasses.dataclass(frozen=True)
class FusionReport:
    """What the fusion pass did: rewrites per rule, activations recorded, near-misses."""

    applied: dict[str, int]
    activations: dict[str, int]
    near_misses: tuple[NearMiss, ...]

    def explanation(self, pass_name: str) -> list[RenderableType]:
        """Rewrites per rule, and the near-misses by reason."""
        return rule_tables(pass_name, self.applied, self.near_misses, self.activations)


@functools.cache
def compiled_rules(target: TargetSpec) -> CompiledTable:
    """The rules ``target`` wants; compiling patterns is slow, so once per target."""
    return compile_table(RULES, target)


class FusionPass(ir.passes.InPlacePass):
    """Runs the fusion rules the target wants; with ``explain``, also finds near-misses."""

    def __init__(self, target: TargetSpec, *, explain: bool = False) -> None:
        super().__init__()
        self.rules = compiled_rules(target)
        self.explain = explain

    def call(self, model: ir.Model) -> ReportingPassResult:
        applied = apply_rules(model, self.rules)
        if any(applied.values()):
            IdentityEliminationPass()(model)
            common.RemoveUnusedNodesPass()(model)
        before = _activation_marks(model)
        recognitions = activations.recognize_activations(model.graph)
        marked = collections.Counter(r.activation for r in recognitions if r.activation)
        misses = self._near_misses(model, recognitions) if self.explain else ()
        modified = any(applied.values()) or _activation_marks(model) != before
        report = FusionReport(applied, dict(marked), misses)
        return ReportingPassResult(model, modified, report)

    def _near_misses(self, model: ir.Model, recognitions) -> tuple[NearMiss, ...]:
        activation_misses = [
            NearMiss(ACTIVATION_RULE, label(r.node), r.reason) for r in recognitions if r.reason
        ]
        return near_misses(model, self.rules) + tuple(activation_misses)


class RuntimeFusionPass(ir.passes.InPlacePass):
    """Runs the ``GRAPH_REWRITES`` the target wants; near-misses are kept when explaining."""

    def __init__(self, target: TargetSpec, *, explain: bool = False) -> None:
        super().__init__()
        self.rewrites = [r for r in GRAPH_REWRITES if r.wanted(target)]
        self.explain = explain

    def call(self, model: ir.Model) -> ReportingPassResult:
        applied: dict[str, int] = {}
        misses: list[NearMiss] = []
        for rewrite in self.rewrites:
            applied[rewrite.name], found = rewrite.apply(model)
            misses.extend(found)
        modified = any(applied.values())
        if modified:
            model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
        report = FusionReport(applied, {}, tuple(misses) if self.explain else ())
        return ReportingPassResult(model, modified, report)


def _activation_marks(model: ir.Model) -> dict[ir.Node, str | None]:
    key = activations.ACTIVATION_KEY
    return {n: n.metadata_props.get(key) for n in all_nodes(model.graph) if key in n.metadata_props}


class PackProjectionsPass(ir.passes.InPlacePass):
    """Packs sibling projections (``packing``); near-misses are kept when explaining."""

    def __init__(self, options: QuantOptions, *, explain: bool = False) -> None:
        super().__init__()
        self.options = options
        self.explain = explain

    def call(self, model: ir.Model) -> ReportingPassResult:
        applied, misses = packing.pack_projections(model, self.options)
        report = FusionReport(applied, {}, misses if self.explain else ())
        return ReportingPassResult(model, any(applied.values()), report)


def _packs(ctx: PassContext) -> PackProjectionsPass | None:
    """Packing where the products run as weight-only kernels (measured there)."""
    quantization = ctx.options.quantization
    if quantization is None or quantization.mode is not Mode.WEIGHT_ONLY:
        return None
    return PackProjectionsPass(quantization, explain=ctx.options.explain)


def _fusion_target(ctx: PassContext) -> TargetSpec:
    """The target as the fusion rules see it. A 2-D MatMul + Add becomes a Gemm where the
    target prefers one (``matmul_add_as_gemm``) for the int32 bias a quantized activation
    gives it; weight-only mode (and dynamic mode's 4-bit MatMuls, ``reads_float_activations``)
    quantizes no activation, and onnxruntime's weight-only kernel,
    ``MatMulNBits`` (which it also fuses ``DQ(w) -> MatMul`` into), is a MatMul's: a Gemm
    reading a dequantized weight runs in float (``FusedGemm``), so there the Gemms become
    MatMul + Add instead (the README's MLP compiled weight-only kept 3 of its 4 layers float
    and its size)."""
    quantization = ctx.options.quantization
    if quantization is None or not reads_float_activations(ctx.target, quantization):
        return ctx.target
    kernels = dataclasses.replace(ctx.target.kernels, matmul_add_as_gemm=False)
    return dataclasses.replace(ctx.target, kernels=kernels)


BUILDERS: dict[str, PassBuilder] = {
    "fusion": lambda ctx: FusionPass(_fusion_target(ctx), explain=ctx.options.explain),
    "runtime-fusion": lambda ctx: (
        RuntimeFusionPass(ctx.target, explain=ctx.options.explain)
        if any(r.wanted(ctx.target) for r in GRAPH_REWRITES)
        else None
    ),
    "pack-projections": _packs,
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
