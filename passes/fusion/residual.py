"""A residual Add and the norm after it: one kernel where the runtime's is faster, two where not.

RMSNorm (``fuse_skip_norms``) becomes onnxruntime's SkipSimplifiedLayerNormalization.

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

LayerNorm (``unfuse_layer_norms``) goes the other way. onnxruntime fuses ``Add`` +
``LayerNormalization`` into its SkipLayerNormalization by itself, whose CPU kernel runs several
times slower than the two ops (``qgraph.targets.runtime.CPU_SLOWER_FUSIONS``). Where the target
lists it as a slower fusion, the Add becomes a two-input ``Sum``. ``Sum(a, b)`` is ``Add(a, b)``,
one correctly rounded addition per element, broadcasting alike from opset 8 on, and onnxruntime
fuses only ``Add``. The Add is rewritten only when the norm is its one reader, since that is the
only Add onnxruntime fuses.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN, onnx_opset
from qgraph.graph.traversal import carry_metadata
from qgraph.passes.fusion.normalization import RUNTIME_RMS_NORM
from qgraph.passes.fusion.rules import FLOAT_TYPES
from qgraph.passes.rule_table import NearMiss, label
from qgraph.targets import TargetSpec

RULE_NAME = "skip-rms-norm"
SUMMARY = "residual Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization"
FUSED_OP = "SkipSimplifiedLayerNormalization"
RANKS = (2, 3)

UNFUSED_RULE = "unfused-layer-norm"
UNFUSED_SUMMARY = "residual Add -> Sum before LayerNormalization (no slower SkipLayerNormalization)"
AVOIDED_FUSION = "SkipLayerNormalization"
SUM_BROADCASTS_OPSET = 8


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


def keeps_layer_norms_unfused(target: TargetSpec) -> bool:
    """Whether ``target``'s runtime would fuse Add + LayerNormalization into a slower kernel."""
    return AVOIDED_FUSION in target.runtime.slower_fusions


def unfuse_layer_norms(model: ir.Model) -> tuple[int, tuple[NearMiss, ...]]:
    """Write each Add read only by a LayerNormalization as Sum; (rewrites, no near-misses)."""
    if onnx_opset(model.opset_imports, 0) < SUM_BROADCASTS_OPSET:
        return 0, ()
    count = 0
    for norm in model.graph:
        if norm.op_type != "LayerNormalization" or norm.domain != "":
            continue
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain != "":
            continue
        total = add.outputs[0]
        if total.is_graph_output() or len(total.uses()) != 1:
            continue
        add.op_type = "Sum"
        add.version = None
        count += 1
    return count, ()
