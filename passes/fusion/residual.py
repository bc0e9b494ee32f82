"""A residual Add and the RMSNorm after it, as onnxruntime's SkipSimplifiedLayerNormalization.

A pre-norm decoder adds each block's output to the residual stream and normalizes the sum for
the next block::

    s = Add(a, b);  y = SimplifiedLayerNormalization(s, gamma, epsilon)     (s read on too)
      -> y, _, _, s = com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma, epsilon)

The kernel adds ``skip`` to ``input``, normalizes the sum over the last axis as
SimplifiedLayerNormalization does (y = s / sqrt(mean(s^2) + eps) * gamma) and returns the sum
as its fourth output, so whatever read ``s`` reads that: one kernel where there were two, the
same float operations in the same order. It does not broadcast: ``a`` and ``b`` must have the
same known shape, of rank 2 or 3, and the norm must be over the last axis with a [D] gamma.
onnxruntime 1.32 fuses this itself only for its GPU providers.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.graph.traversal import carry_metadata
from qgraph.passes.fusion.normalization import RUNTIME_RMS_NORM
from qgraph.passes.fusion.rules import FLOAT_TYPES
from qgraph.passes.rule_table import NearMiss, label
from qgraph.targets import TargetSpec

RULE_NAME = "skip-rms-norm"
SUMMARY = "residual Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization"
FUSED_OP = "SkipSimplifiedLayerNormalization"
RANKS = (2, 3)


def wanted(target: TargetSpec) -> bool:
    """Whether ``target`` runs the op this rewrite emits."""
    return MICROSOFT_DOMAIN in target.runtime.allowed_domains


def fuse_skip_norms(model: ir.Model) -> tuple[int, tuple[NearMiss, ...]]:
    """Rewrite every residual Add + RMSNorm of ``model``; (rewrites, near-misses)."""
    graph, count, misses = model.graph, 0, []
    for norm in [n for n in graph if n.op_type == RUNTIME_RMS_NORM and n.domain == ""]:
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain != "":
            continue
        problem = _problem(add, norm)
        if problem is not None:
            misses.append(NearMiss(RULE_NAME, label(norm), problem))
            continue
        _replace(graph, add, norm)
        count += 1
    return count, tuple(misses)


def _problem(add: ir.Node, norm: ir.Node) -> str | None:
    """Why ``add`` and ``norm`` are not one SkipSimplifiedLayerNormalization (None if they are)."""
    a, b = add.inputs
    if a.shape is None or b.shape is None or a.shape != b.shape or len(a.shape) not in RANKS:
        return f"'{a.name}' and '{b.name}' are not of one known shape of rank 2 or 3"
    if a.dtype not in FLOAT_TYPES or b.dtype != a.dtype:
        return f"the Add's inputs are {a.dtype} and {b.dtype}"
    axis = norm.attributes.get_int("axis", -1)
    if axis not in (-1, len(a.shape) - 1) or len(norm.outputs) > 1 or len(norm.inputs) != 2:
        return "the norm is not over the last axis alone, or returns its statistics"
    gamma = norm.inputs[1]
    if gamma.shape is None or list(gamma.shape) != [a.shape[-1]]:
        return f"gamma '{gamma.name}' is not one value per channel"
    return None


def _replace(graph: ir.Graph, add: ir.Node, norm: ir.Node) -> None:
    epsilon = norm.attributes.get_float("epsilon", 1e-5)
    fused = ir.node(
        FUSED_OP,
        [*add.inputs, norm.inputs[1]],
        attributes={"epsilon": epsilon},
        domain=MICROSOFT_DOMAIN,
        num_outputs=4,
        name=norm.name,
    )
    output, _, _, total = fused.outputs
    carry_metadata([add, norm], norm, [fused])
    ir.convenience.replace_nodes_and_values(
        graph, add, [add, norm], [fused], [norm.outputs[0], add.outputs[0]], [output, total]
    )
