"""Walking graphs: every node of a graph, subgraphs included, quickly; and from an activation
back to the weighted op that produced it.

``onnx_ir.traversal.RecursiveGraphIterator`` costs ~2 us a node; passes over 40k-node graphs
walk the graph many times, so qgraph uses this plain generator (same order: a node, then the
nodes of its subgraphs).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops with a weight operand, which runtimes fuse with a following bias, activation or Add."""

_ONNX_DOMAINS = frozenset({"", "ai.onnx"})
_GRAPH = ir.AttributeType.GRAPH
_GRAPHS = ir.AttributeType.GRAPHS


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and, right after a node, those of its subgraphs."""
    for node in graph:
        yield node
        if node.attributes:
            for attr in node.attributes.values():
                if attr.type is _GRAPH:
                    yield from all_nodes(attr.value)
                elif attr.type is _GRAPHS:
                    for subgraph in attr.value:
                        yield from all_nodes(subgraph)


def weighted_producer(value: ir.Value) -> ir.Node | None:
    """The weighted op (``WEIGHTED_OPS``) whose output ``value`` is, directly or with a constant
    added (a bias ``Add``); None when ``value`` comes from anything else."""
    node = value.producer()
    if _is_bias_add(node):
        first, second = node.inputs
        source = second if _is_constant(first) else first
        node = source.producer()
    if node is None or node.domain not in _ONNX_DOMAINS or node.op_type not in WEIGHTED_OPS:
        return None
    return node


def _is_bias_add(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.op_type == "Add"
        and node.domain in _ONNX_DOMAINS
        and len(node.inputs) == 2
        and sum(_is_constant(v) for v in node.inputs) == 1
    )


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None
