"""A networkx view of an onnx_ir graph, for analysis (paths, dominators, regions) and drawing.

The view is a snapshot: a ``networkx.MultiDiGraph`` whose nodes are the ``ir.Node`` objects
themselves plus one node per graph input and output, and whose edges are the values flowing
between them (a node reading the same value twice gets two edges). Rewrites go through
onnx_ir, never through the view.

Node attributes: ``kind`` (``"op"``, ``"input"`` or ``"output"``), ``label`` (op type or
tensor name), ``name``. Edge attributes: ``value`` (the ``ir.Value``), ``name``, ``dtype``,
``shape``, ``index`` (input position at the consumer).
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class GraphPort:
    """A graph input or output as a node of the view."""

    kind: str
    name: str


def to_networkx(graph: ir.Graph) -> nx.MultiDiGraph:
    """A snapshot of ``graph``'s dataflow as a ``networkx.MultiDiGraph`` (see module doc)."""
    view = nx.MultiDiGraph(name=graph.name or "")
    sources: dict[ir.Value, object] = {}
    for value in graph.inputs:
        port = GraphPort("input", value.name or "")
        view.add_node(port, kind="input", label=port.name, name=port.name)
        sources[value] = port
    for node in graph:
        view.add_node(node, kind="op", label=node.op_type, name=node.name or "")
        for value in node.outputs:
            sources[value] = node
    for node in graph:
        for index, value in enumerate(node.inputs):
            if value is not None and value in sources:
                view.add_edge(sources[value], node, **_edge_data(value, index))
    for index, value in enumerate(graph.outputs):
        port = GraphPort("output", value.name or "")
        view.add_node(port, kind="output", label=port.name, name=port.name)
        if value in sources:
            view.add_edge(sources[value], port, **_edge_data(value, index))
    return view


def _edge_data(value: ir.Value, index: int) -> dict[str, object]:
    return {
        "value": value,
        "name": value.name or "",
        "dtype": value.dtype.name.lower() if value.dtype is not None else None,
        "shape": str(value.shape) if value.shape is not None else None,
        "index": index,
    }
