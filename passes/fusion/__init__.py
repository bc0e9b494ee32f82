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
- ``activations``: ``x * HardSigmoid(x)`` to HardSwish; activations after weighted ops recorded
- ``gemm``: 2-D MatMul + Add to Gemm, or Gemm to MatMul + Add, as the target prefers

Every rule keeps the function: outputs equal the original's to float32 rounding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import RewriteRule

from qgraph.passes.canonicalize import IdentityEliminationPass
from qgraph.passes.fusion import activations, batchnorm, gelu, gemm, normalization, onehot, scales
from qgraph.pipeline import Phase, ReportingPassResult
from qgraph.registry import PassInfo
from qgraph.targets import TargetSpec
from qgraph.traversal import all_nodes

MAX_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class FusionRule:
    """A rule of the table: its name, what it does, its rule classes, which targets want it."""

    name: str
    summary: str
    rule_classes: tuple[type[pattern.RewriteRuleClassBase], ...]
    wanted: Callable[[TargetSpec], bool] = lambda target: True

    def variants(self, target: TargetSpec) -> list[tuple[frozenset[str], RewriteRule]]:
        """(root op types, rule) for every operand order of commutative ops in each pattern."""
        return [
            (rule_class.root_ops, variant)
            for rule_class in self.rule_classes
            for variant in rule_class.rule(target, self.name).commute()
        ]


RULES = (
    FusionRule(
        "transpose-chain", "Transpose(Transpose(x)) -> one or none", (scales.TransposeTranspose,)
    ),
    FusionRule(
        "reshape-chain", "Reshape(Reshape(x, s), t) -> Reshape(x, t)", (scales.ReshapeReshape,)
    ),
    FusionRule(
        "one-hot-to-gather",
        "MatMul(one-hot(ids), W) -> Gather(W, ids)",
        (onehot.OneHotMatMulToGather,),
    ),
    FusionRule(
        "fold-batchnorm",
        "BatchNormalization into Conv/ConvTranspose/Gemm/MatMul",
        (batchnorm.FoldBatchNorm,),
    ),
    FusionRule(
        "scale-after-matmul",
        "MatMul(x, W) * c or / c -> MatMul(x, W')",
        (scales.ScaleAfterMatMul, scales.DivisionAfterMatMul),
    ),
    FusionRule(
        "scale-before-matmul",
        "MatMul(x * c or x / c, W) -> MatMul(x, W')",
        (scales.ScaleBeforeMatMul, scales.DivisionBeforeMatMul),
    ),
    FusionRule(
        "scale-after-conv",
        "Conv(x, W, b) * c or / c -> Conv(x, W', b')",
        (scales.ScaleAfterConv, scales.DivisionAfterConv),
    ),
    FusionRule(
        "scale-before-conv",
        "Conv(x * c or x / c, W) -> Conv(x, W')",
        (scales.ScaleBeforeConv, scales.DivisionBeforeConv),
    ),
    FusionRule(
        "layer-norm", "decomposed LayerNorm -> LayerNormalization", (normalization.LayerNormFusion,)
    ),
    FusionRule(
        "layer-norm-bias",
        "LayerNormalization + beta -> LayerNormalization(.., beta)",
        (normalization.LayerNormBiasFusion,),
    ),
    FusionRule(
        "rms-norm",
        "decomposed RMSNorm -> RMSNormalization / SimplifiedLayerNormalization",
        (normalization.RMSNormFusion,),
    ),
    FusionRule(
        "gelu-erf",
        "x * 0.5 * (1 + erf(x / sqrt 2)) -> Gelu",
        (gelu.GeluErfFusion, gelu.GeluErfHalfLast),
    ),
    FusionRule(
        "gelu-tanh",
        "tanh-approximated GELU -> Gelu(approximate=tanh) / FastGelu",
        (gelu.GeluTanhFusion, gelu.GeluTanhHalfLast),
    ),
    FusionRule("hard-swish", "x * HardSigmoid(x) -> HardSwish", (activations.HardSwishFusion,)),
    FusionRule(
        "matmul-add-to-gemm",
        "2-D MatMul + Add -> Gemm",
        (gemm.MatMulAddToGemm,),
        wanted=lambda target: target.matmul_add_as_gemm,
    ),
    FusionRule(
        "gemm-to-matmul-add",
        "Gemm -> MatMul + Add",
        (gemm.GemmToMatMulAdd,),
        wanted=lambda target: not target.matmul_add_as_gemm,
    ),
)
ACTIVATION_RULE = "activation"


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A place a rule almost applied, and why it did not."""

    rule: str
    node: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FusionReport:
    """What the fusion pass did: rewrites per rule, activations recorded, near-misses."""

    applied: dict[str, int]
    activations: dict[str, int]
    near_misses: tuple[NearMiss, ...]


@functools.cache
def compiled_rules(target: TargetSpec) -> tuple[tuple[str, list], ...]:
    """(name, variants) of the rules ``target`` wants; compiling patterns is slow, so once."""
    return tuple((rule.name, rule.variants(target)) for rule in RULES if rule.wanted(target))


class FusionPass(ir.passes.InPlacePass):
    """Runs the fusion rules the target wants; with ``explain``, also finds near-misses.

    Rules are tried only at nodes of their pattern's root op type (trying every rule at every
    node costs ~40 us a try in onnxscript's matcher, most of a minute on SmolLM2).
    """

    def __init__(self, target: TargetSpec, *, explain: bool = False) -> None:
        super().__init__()
        self.rules = compiled_rules(target)
        self.explain = explain

    def call(self, model: ir.Model) -> ReportingPassResult:
        applied = self._rewrite(model)
        if any(applied.values()):
            IdentityEliminationPass()(model)
            common.RemoveUnusedNodesPass()(model)
        before = _activation_marks(model)
        recognitions = activations.recognize_activations(model.graph)
        marked = collections.Counter(r.activation for r in recognitions if r.activation)
        near_misses = self._near_misses(model, recognitions) if self.explain else ()
        modified = any(applied.values()) or _activation_marks(model) != before
        report = FusionReport(applied, dict(marked), near_misses)
        return ReportingPassResult(model, modified, report)

    def _rewrite(self, model: ir.Model) -> dict[str, int]:
        applied = {name: 0 for name, _ in self.rules}
        for _ in range(MAX_ROUNDS):
            changed = 0
            for name, variants in self.rules:
                count = sum(_apply(variants, model, graph) for graph in list(model.graphs()))
                applied[name] += count
                changed += count
            if not changed:
                break
        return applied

    def _near_misses(self, model: ir.Model, recognitions) -> tuple[NearMiss, ...]:
        recorder = _NearMissRecorder()
        for _, variants in self.rules:
            for graph in model.graphs():
                for node in graph:
                    for roots, rule in variants:
                        if node.op_type in roots:
                            rule.try_rewrite(model, graph, node, tracer=recorder)
        activation_misses = [
            NearMiss(ACTIVATION_RULE, _label(r.node), r.reason) for r in recognitions if r.reason
        ]
        return tuple(recorder.misses.values()) + tuple(activation_misses)


def _apply(
    variants: list[tuple[frozenset[str], RewriteRule]], model: ir.Model, graph: ir.Graph
) -> int:
    """Rewrite every match of the rule's variants in ``graph`` (not its subgraphs); the count."""
    count = 0
    for node in graph:
        for roots, rule in variants:
            if node.op_type not in roots:
                continue
            delta = rule.try_rewrite(model, graph, node)
            if delta is None:
                continue
            for initializer in delta.new_initializers:
                graph.register_initializer(initializer)
            ir.convenience.replace_nodes_and_values(
                graph,
                node,
                delta.match.nodes,
                delta.new_nodes,
                delta.match.outputs,
                delta.new_outputs,
            )
            count += 1
            break
    return count


class _NearMissRecorder:
    """An onnxscript matching tracer keeping every failed check that gave a reason."""

    def __init__(self) -> None:
        self.misses: dict[tuple[str, int, str], NearMiss] = {}

    def log(self, rule, container, node, match_result, status) -> None:
        reason = match_result.reason
        if status.name != "CONDITION_FAILED" or not reason:
            return
        key = (rule.name, id(node), reason)
        self.misses.setdefault(key, NearMiss(rule.name, _label(node), reason))


def _label(node: ir.Node) -> str:
    output = node.outputs[0].name if node.outputs else ""
    return node.name or f"{node.op_type} -> {output}"


def _activation_marks(model: ir.Model) -> dict[ir.Node, str | None]:
    key = activations.ACTIVATION_KEY
    return {n: n.metadata_props.get(key) for n in all_nodes(model.graph) if key in n.metadata_props}


PASSES = (
    PassInfo(
        "fusion",
        Phase.FLOAT_REWRITES,
        "fold BatchNorm and constant scales into weights, fuse LayerNorm/RMSNorm/GELU, "
        "record activations",
        lambda ctx: FusionPass(ctx.target, explain=ctx.options.explain),
    ),
)
