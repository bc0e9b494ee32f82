"""Activations after a weighted op, recognized so the pair is quantized (and run) as one.

A Conv / ConvTranspose / Gemm / MatMul whose output goes only to one of

    Relu, LeakyRelu, Clip (constant bounds; ReLU6 is Clip(0, 6)), HardSigmoid, HardSwish,
    Sigmoid, SiLU (``y * Sigmoid(y)``)

gets its activation recorded in node metadata (``qgraph.activation``). Later phases read it:
Q/DQ goes after the activation only, so its output range is quantized once (onnxruntime and
TensorRT fuse such pairs into one integer kernel), and targets with fused kernels lower the
pair. Nothing about the function changes. ``x * HardSigmoid(x; 1/6, 1/2)`` is first rewritten
to ``HardSwish(x)`` (opset 14), which is what it computes.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS
from qgraph.graph.traversal import all_nodes
from qgraph.passes.fusion.rules import (
    MatchResult,
    TargetRule,
    close_to,
    constant,
    fail,
    model_opset,
)

ACTIVATION_KEY = "qgraph.activation"
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SINGLE_INPUT_ACTIVATIONS = frozenset(
    {"Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Clip"}
)
HARD_SWISH_OPSET = 14


class HardSwishFusion(TargetRule):
    """``x * HardSigmoid(x, alpha=1/6, beta=1/2)`` -> ``HardSwish(x)``."""

    root_ops = frozenset({"Mul"})

    def pattern(self, op, x):
        return op.Mul(x, op.HardSigmoid(x, _allow_other_attributes=True, _outputs=["gate"]))

    def check(self, context, x, gate, **_) -> MatchResult:
        attributes = gate.producer().attributes
        alpha, beta = attributes.get_float("alpha", 0.2), attributes.get_float("beta", 0.5)
        if not (close_to(alpha, 1 / 6) and close_to(beta, 0.5)):
            return fail(f"HardSigmoid(alpha={alpha:g}, beta={beta:g}) is not HardSwish's", x)
        if model_opset(context) < HARD_SWISH_OPSET:
            return fail(f"opset {model_opset(context)} has no HardSwish (from 14)", x)
        return MatchResult()

    def rewrite(self, op, x, **_):
        return op.HardSwish(x)


@dataclasses.dataclass(frozen=True)
class Recognition:
    """A weighted node and the activation recorded for it, or why none was."""

    node: ir.Node
    activation: str | None
    reason: str | None = None


def recognize_activations(graph: ir.Graph) -> list[Recognition]:
    """Record the activation of every weighted op that has one (in ``graph`` and subgraphs)."""
    results = []
    for node in all_nodes(graph):
        if node.op_type not in WEIGHTED or node.domain not in ONNX_DOMAINS:
            continue
        activation, reason = _activation_of(node.outputs[0])
        if activation is not None:
            node.metadata_props[ACTIVATION_KEY] = activation
        if activation is not None or reason is not None:
            results.append(Recognition(node, activation, reason))
    return results


def _activation_of(value: ir.Value) -> tuple[str | None, str | None]:
    """(activation, None), (None, why not) for a near-miss, or (None, None): no activation."""
    consumers = [node for node, _ in value.uses()]
    kinds = {node.op_type for node in consumers}
    if len(consumers) == 2 and kinds == {"Sigmoid", "Mul"}:
        sigmoid = next(n for n in consumers if n.op_type == "Sigmoid")
        mul = next(n for n in consumers if n.op_type == "Mul")
        if set(mul.inputs) == {value, sigmoid.outputs[0]}:
            return "SiLU", None
    activations = [n for n in consumers if n.op_type in SINGLE_INPUT_ACTIVATIONS]
    if not activations:
        return None, None
    if len(consumers) > 1 or value.is_graph_output():
        return None, f"{activations[0].op_type} is not the only reader of '{value.name}'"
    activation = activations[0]
    if activation.op_type == "Clip" and not _constant_bounds(activation):
        return None, "Clip bounds are not constants"
    return activation.op_type, None


def _constant_bounds(clip: ir.Node) -> bool:
    return all(bound is None or constant(bound) is not None for bound in clip.inputs[1:])
