"""Walking every node of a graph, subgraphs included, quickly.

``onnx_ir.traversal.RecursiveGraphIterator`` costs ~2 us a node; passes over 40k-node graphs
walk the graph many times, so qgraph uses this plain generator (same order: a node, then the
nodes of its subgraphs).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

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
