"""qgraph.analysis.graph_view: the networkx view has one node per op and port, one edge per use."""

from __future__ import annotations

import networkx as nx
from onnx import helper

import qgraph
from qgraph.analysis.graph_view import GraphPort
from qgraph.passes.canonicalize import ShapeInferencePass


def test_view_mirrors_dataflow(make_model):
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("Mul", ["a", "a"], ["b"], name="square"),
            helper.make_node("Add", ["b", "x"], ["y"], name="add"),
        ],
        {"x": [3]},
        {"y": [3]},
    )
    model = ShapeInferencePass()(qgraph.load(proto)).model
    view = qgraph.to_networkx(model.graph)
    ops = {data["name"]: node for node, data in view.nodes(data=True) if data["kind"] == "op"}
    assert set(ops) == {"relu", "square", "add"}
    x, y = GraphPort("input", "x"), GraphPort("output", "y")
    assert view.number_of_edges(ops["relu"], ops["square"]) == 2, "Mul reads a twice"
    assert view.has_edge(x, ops["add"]) and view.has_edge(ops["add"], y)
    edge = view.get_edge_data(ops["square"], ops["add"])[0]
    assert (edge["name"], edge["dtype"], edge["index"]) == ("b", "float", 0)
    order = [
        view.nodes[n]["name"] for n in nx.topological_sort(view) if view.nodes[n]["kind"] == "op"
    ]
    assert order == ["relu", "square", "add"]


def test_initializers_are_not_nodes(small_model):
    view = qgraph.to_networkx(qgraph.load(small_model).graph)
    kinds = sorted(data["kind"] for _, data in view.nodes(data=True))
    assert kinds == ["input", "op", "op", "op", "output"]
