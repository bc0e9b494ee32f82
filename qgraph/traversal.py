"""Walking graphs: every node of a graph, subgraphs included, quickly; from an activation
back to the weighted op that produced it; and from a rewritten node back to the input
model's nodes it stands for.

``onnx_ir.traversal.RecursiveGraphIterator`` costs ~2 us a node; passes over 40k-node graphs
walk the graph many times, so qgraph uses this plain generator (same order: a node, then the
nodes of its subgraphs).
"""

from __future__ import annotations

import json
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
            for subgraph in subgraphs(node):
                yield from all_nodes(subgraph)


def subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs ``node`` holds in its attributes (an If's branches, a Loop's body)."""
    for attr in node.attributes.values():
        if attr.type is _GRAPH:
            yield attr.value
        elif attr.type is _GRAPHS:
            yield from attr.value


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


SOURCE_NODES_KEY = "qgraph.source_nodes"
"""Node metadata key: the JSON list of the input model's node names a rewritten node
replaces (a fusion's matched nodes), so exclusions by input name still find it."""


def source_names(node: ir.Node) -> tuple[str, ...]:
    """The input model's names ``node`` stands for: its recorded sources, else its name."""
    recorded = node.metadata_props.get(SOURCE_NODES_KEY)
    if recorded:
        return tuple(json.loads(recorded))
    return (node.name,) if node.name else ()


def carry_metadata(replaced: list[ir.Node], root: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Give each of a rewrite's ``new_nodes`` the names of all the ``replaced`` nodes'
    sources, and the ``root``'s metadata it lacks (an exporter's scopes, as torch's
    ``pkg.torch.onnx.name_scopes``)."""
    sources = list(dict.fromkeys(name for node in replaced for name in source_names(node)))
    for new in new_nodes:
        for key, value in root.metadata_props.items():
            new.metadata_props.setdefault(key, value)
        if sources:
            new.metadata_props[SOURCE_NODES_KEY] = json.dumps(sources)
