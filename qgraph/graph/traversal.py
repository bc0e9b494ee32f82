"""Walking graphs: every node of a graph, subgraphs included, quickly; from an activation
back to the weighted op that produced it; and from a rewritten node back to the input
model's nodes it stands for.

``onnx_ir.traversal.RecursiveGraphIterator`` costs ~2 us a node; passes over 40k-node graphs
walk the graph many times, so qgraph uses this plain generator (same order: a node, then the
nodes of its subgraphs).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS, WEIGHTED_OPS

_GRAPH = ir.AttributeType.GRAPH
_GRAPHS = ir.AttributeType.GRAPHS


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and, right after a node, those of its subgraphs."""
    for node in graph:
        yield node
        if node.attributes:
            for subgraph in subgraphs(node):
                yield from all_nodes(subgraph)


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, each model-local function's body, and every graph nested in a node of
    either (If/Loop/Scan bodies, any GRAPH or GRAPHS attribute), at any depth."""
    for top in (model.graph, *(function.graph for function in model.functions.values())):
        yield from _nested_graphs(top)


def _nested_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        if node.attributes:
            for subgraph in subgraphs(node):
                yield from _nested_graphs(subgraph)


def proto_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The serialized counterpart of ``all_graphs``: the main graph and every graph nested in
    a node of it or of a model-local function, before onnx_ir reads them."""
    yield from _nested_proto_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for graph in _proto_subgraphs(node):
                yield from _nested_proto_graphs(graph)


def proto_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a serialized model: initializers and tensor attributes of the main
    graph, of model-local functions and of every nested graph."""
    for graph in proto_graphs(model):
        yield from graph.initializer
        yield from _attribute_tensors(graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _nested_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for subgraph in _proto_subgraphs(node):
            yield from _nested_proto_graphs(subgraph)


def _proto_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _attribute_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


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
    if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in WEIGHTED_OPS:
        return None
    return node


def _is_bias_add(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.op_type == "Add"
        and node.domain in ONNX_DOMAINS
        and len(node.inputs) == 2
        and sum(_is_constant(v) for v in node.inputs) == 1
    )


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None


KEEP_FLOAT_KEY = "qgraph.keep_float"
"""Node metadata (saved with the model): this node stays in float, and the value says why. A
float rewrite sets it on nodes it adds (an online rotation); insert-qdq on a residual ``Add``
whose skip input calibration keeps float, which the TensorRT rules then accept."""

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
