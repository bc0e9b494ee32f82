"""Drawing a model's graph: Graphviz DOT, SVG, or a self-contained HTML page.

The drawing marks what quantization did: quantized ops (those that read a dequantized tensor,
or integer operators), Q/DQ nodes, and ops left in float, each in its own color; hovering a
node shows its name, inputs and outputs, the pass that made it (``qgraph.pass`` provenance)
and, for Q/DQ nodes, their scales and zero points.

Large graphs stay readable two ways. ``around`` keeps only the nodes within ``radius`` edges of
the named ones. Otherwise, a graph of more than ``COLLAPSE_ABOVE`` ops collapses its repeated
blocks: nodes are grouped by the numbered module they come from (``layers.7``, read from the
node name or the torch exporter's scope metadata), the first block of each kind stays drawn
and every later one becomes a single box that says how many ops, and how many quantized ops,
it holds.

The layout is layered: an op's layer is the length of the longest path to it from a graph
input (boxes on a cycle, which collapsing can make, share one layer; a box fed by nothing,
such as a weight's DequantizeLinear, sits just above its first reader), and each layer is
ordered by the mean position of the nodes feeding it (one sweep of the barycenter heuristic),
which keeps a transformer's block readable top to bottom.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import html
import json
import re
from pathlib import Path

import networkx as nx
import numpy as np
import onnx_ir as ir

from qgraph.analysis.graph_view import GraphPort, to_networkx
from qgraph.atomic import replaced_file
from qgraph.errors import QGraphError
from qgraph.graph.ops import QDQ_OPS
from qgraph.inspection import is_quantized_op, op_key, torch_name_scopes
from qgraph.pipeline import PROVENANCE_KEY
from qgraph.sections import counted

FORMATS = ("html", "svg", "dot")
COLLAPSE_ABOVE = 400
"""Ops above which repeated blocks are collapsed (unless ``around`` selects a region)."""
BOX_WIDTH, BOX_HEIGHT, GAP_X, GAP_Y = 170, 38, 24, 34
BLOCK_PATTERN = re.compile(r"^(/?(?:[^/]+/)*?[^/]*\.\d+)/")
"""A numbered module in a node's path: ``/model/layers.7/mlp/MatMul`` -> ``/model/layers.7``."""
STYLE = {
    "quantized": "#f4a259",
    "qdq": "#8cb8e8",
    "float": "#e8e8e8",
    "block": "#c9b8e8",
    "port": "#ffffff",
}
"""Fill color of each kind of box."""


class DrawError(QGraphError):
    """The drawing cannot be made as asked."""


@dataclasses.dataclass
class Box:
    """One drawn box: an op, a graph input or output, or a collapsed block."""

    key: str
    label: str
    kind: str
    details: dict[str, str]
    x: float = 0.0
    y: float = 0.0


@dataclasses.dataclass
class Drawing:
    """Boxes with positions, the edges between them (by box key, with the tensor name)."""

    title: str
    boxes: dict[str, Box]
    edges: list[tuple[str, str, str]]

    @property
    def width(self) -> float:
        return max((box.x for box in self.boxes.values()), default=0) + BOX_WIDTH + GAP_X

    @property
    def height(self) -> float:
        return max((box.y for box in self.boxes.values()), default=0) + BOX_HEIGHT + GAP_Y


def draw(
    model: ir.Model,
    path: Path,
    *,
    around: tuple[str, ...] = (),
    radius: int = 3,
    title: str = "model",
) -> Drawing:
    """Write a drawing of ``model`` to ``path`` (the format from its suffix); the drawing."""
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise DrawError(f"{path}: cannot draw as '.{suffix}'; use one of .html, .svg, .dot")
    drawing = layout(model, around=around, radius=radius, title=title)
    text = {"html": to_html, "svg": to_svg, "dot": to_dot}[suffix](drawing)
    with replaced_file(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return drawing


def layout(
    model: ir.Model, *, around: tuple[str, ...] = (), radius: int = 3, title: str = "model"
) -> Drawing:
    """The boxes and edges to draw, positioned (see the module doc)."""
    view = to_networkx(model.graph)
    if around:
        view = view.subgraph(_region(view, around, radius)).copy()
    ops = [n for n in view if isinstance(n, ir.Node)]
    groups = _collapsed_blocks(ops) if not around and len(ops) > COLLAPSE_ABOVE else {}
    boxes: dict[str, Box] = {}
    owner: dict[object, str] = {}
    for item in view:
        if item in groups:
            block, members = groups[item]
            key = f"block:{block}"
            if key not in boxes:
                boxes[key] = _block_box(key, block, members)
        else:
            box = _box(item)
            key = box.key
            boxes[key] = box
        owner[item] = key
    edges = {
        (owner[a], owner[b], data["name"])
        for a, b, data in view.edges(data=True)
        if owner[a] != owner[b]
    }
    _place(boxes, edges)
    return Drawing(title, boxes, sorted(edges))


def _region(view: nx.MultiDiGraph, names: tuple[str, ...], radius: int) -> set[object]:
    """The nodes within ``radius`` edges (either direction) of the ops called ``names``."""
    by_name = {node.name: node for node in view if isinstance(node, ir.Node)}
    undirected = view.to_undirected(as_view=True)
    kept: set[object] = set()
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise DrawError(f"--around: the model has no node named '{name}'{hint}")
        kept.update(nx.single_source_shortest_path_length(undirected, by_name[name], radius))
    return kept


def block_of(node: ir.Node) -> str | None:
    """The numbered module ``node`` belongs to (``/model/layers.7``), or None."""
    for part in torch_name_scopes(node):
        if re.search(r"\.\d+$", part):
            return part
    found = BLOCK_PATTERN.match(node.name or "")
    return found.group(1) if found else None


def _collapsed_blocks(ops: list[ir.Node]) -> dict[ir.Node, tuple[str, list[ir.Node]]]:
    """Op -> (block, its ops) for every op in a numbered block after the first of its kind.
    An op with no block of its own (a Q/DQ node qgraph added) joins its first reader's."""
    own: dict[ir.Node, str] = {}
    for node in reversed(ops):  # readers come later in a topologically sorted graph
        block = block_of(node) or next(
            (own[user] for value in node.outputs for user, _ in value.uses() if user in own),
            None,
        )
        if block is not None:
            own[node] = block
    members: dict[str, list[ir.Node]] = collections.defaultdict(list)
    for node in ops:
        if node in own:
            members[own[node]].append(node)
    first_of_kind: dict[str, str] = {}
    for block in members:
        first_of_kind.setdefault(re.sub(r"\d+$", "#", block), block)
    kept = set(first_of_kind.values())
    return {
        node: (block, nodes)
        for block, nodes in members.items()
        if block not in kept
        for node in nodes
    }


def _block_box(key: str, block: str, nodes: list[ir.Node]) -> Box:
    quantized = sum(is_quantized_op(node) for node in nodes)
    return Box(
        key,
        f"{block} ({counted(len(nodes), 'op')})",
        "block",
        {"block": block, "ops": str(len(nodes)), "quantized ops": str(quantized)},
    )


def _box(item: object) -> Box:
    if isinstance(item, GraphPort):
        return Box(f"{item.kind}:{item.name}", item.name, "port", {item.kind: item.name})
    node: ir.Node = item
    kind = "qdq" if node.op_type in QDQ_OPS else "quantized" if is_quantized_op(node) else "float"
    details = {
        "name": node.name or "",
        "op": op_key(node),
        "inputs": ", ".join(v.name for v in node.inputs if v is not None),
        "outputs": ", ".join(v.name for v in node.outputs),
    }
    made_by = node.metadata_props.get(PROVENANCE_KEY)
    if made_by:
        details["made by"] = made_by
    if kind == "qdq":
        details.update(_quantization_parameters(node))
    return Box(f"node:{id(node)}", f"{op_key(node)}", kind, details)


def _quantization_parameters(node: ir.Node) -> dict[str, str]:
    """Scale and zero point of a Q/DQ node, as text (a vector: its length and range)."""
    found = {}
    for label, index in (("scale", 1), ("zero point", 2)):
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and value.const_value is not None:
            found[label] = _describe(value.const_value.numpy())
    axis = node.attributes.get("axis")
    if axis is not None and "scale" in found and "..." in found["scale"]:
        found["axis"] = str(axis.as_int())
    return found


def _describe(array: np.ndarray) -> str:
    if array.size == 1:
        return f"{array.reshape(-1)[0]:.6g}"
    return f"{array.size} values in [{array.min():.4g}, {array.max():.4g}] ..."


def _place(boxes: dict[str, Box], edges: set[tuple[str, str, str]]) -> None:
    """Layered positions (see the module doc), in place."""
    graph = nx.DiGraph()
    graph.add_nodes_from(boxes)
    graph.add_edges_from((a, b) for a, b, _ in edges)
    dag = nx.condensation(graph)  # a collapsed block can sit on a cycle: one layer for it
    depth_of: dict[int, int] = {}
    for component in nx.topological_sort(dag):
        depth_of[component] = max((depth_of[p] + 1 for p in dag.predecessors(component)), default=0)
    layer = {key: depth_of[dag.graph["mapping"][key]] for key in boxes}
    for key in boxes:  # a box fed by nothing (a weight's DQ) sits just above its first reader
        readers = [layer[r] for r in graph.successors(key)]
        if not any(True for _ in graph.predecessors(key)) and readers:
            layer[key] = max(min(readers) - 1, 0)
    rows: dict[int, list[str]] = collections.defaultdict(list)
    for key in boxes:
        rows[layer[key]].append(key)
    column: dict[str, float] = {}
    for depth in sorted(rows):
        row = rows[depth]
        row.sort(key=lambda k: _barycenter(graph, column, k))
        for index, key in enumerate(row):
            column[key] = index
            boxes[key].x = GAP_X + index * (BOX_WIDTH + GAP_X)
            boxes[key].y = GAP_Y + depth * (BOX_HEIGHT + GAP_Y)


def _barycenter(graph: nx.DiGraph, column: dict[str, float], key: str) -> float:
    """The mean column of the boxes above that feed ``key`` (the end, where none has one)."""
    placed = [column[p] for p in graph.predecessors(key) if p in column]
    return float(np.mean(placed)) if placed else float(len(column))


# Output formats


def to_dot(drawing: Drawing) -> str:
    """Graphviz text: one node per box (filled by kind, details as tooltip), edges labelled."""
    lines = [f"digraph {json.dumps(drawing.title)} {{", '  node [shape=box, style="filled"];']
    for box in drawing.boxes.values():
        tooltip = "\\n".join(f"{k}: {v}" for k, v in box.details.items())
        lines.append(
            f"  {json.dumps(box.key)} [label={json.dumps(box.label)}, "
            f'fillcolor="{STYLE[box.kind]}", tooltip={json.dumps(tooltip)}, '
            f'class="{box.kind}"];'
        )
    for source, target, name in drawing.edges:
        lines.append(
            f"  {json.dumps(source)} -> {json.dumps(target)} [tooltip={json.dumps(name)}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(drawing: Drawing) -> str:
    """A standalone SVG; each box's details are its hover title."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{drawing.width:.0f}" '
        f'height="{drawing.height:.0f}" font-family="sans-serif" font-size="12">'
    ]
    for source, target, name in drawing.edges:
        a, b = drawing.boxes[source], drawing.boxes[target]
        x1, y1 = a.x + BOX_WIDTH / 2, a.y + BOX_HEIGHT
        x2, y2 = b.x + BOX_WIDTH / 2, b.y
        middle = (y1 + y2) / 2
        parts.append(
            f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{middle:.0f} {x2:.0f},'
            f'{middle:.0f} {x2:.0f},{y2:.0f}" fill="none" stroke="#888">'
            f"<title>{html.escape(name)}</title></path>"
        )
    for box in drawing.boxes.values():
        title = "\n".join(f"{k}: {v}" for k, v in box.details.items())
        name = box.details.get("name", box.label)
        parts.append(
            f'<g class="box {box.kind}" data-name="{html.escape(name)}" '
            f'data-details="{html.escape(json.dumps(box.details))}">'
            f"<title>{html.escape(title)}</title>"
            f'<rect x="{box.x:.0f}" y="{box.y:.0f}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" '
            f'rx="5" fill="{STYLE[box.kind]}" stroke="#555"/>'
            f'<text x="{box.x + BOX_WIDTH / 2:.0f}" y="{box.y + BOX_HEIGHT / 2 + 4:.0f}" '
            f'text-anchor="middle">{html.escape(_clip(box.label))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _clip(text: str, length: int = 24) -> str:
    return text if len(text) <= length else text[: length - 1] + "\u2026"


def to_html(drawing: Drawing) -> str:
    """One self-contained page: the SVG, a legend, a search box and a details panel."""
    counts = collections.Counter(box.kind for box in drawing.boxes.values())
    legend = " ".join(
        f'<span class="key" style="background:{STYLE[kind]}">{kind} {counts.get(kind, 0)}</span>'
        for kind in ("quantized", "qdq", "float", "block")
        if counts.get(kind)
    )
    return _PAGE.format(title=html.escape(drawing.title), legend=legend, svg=to_svg(drawing))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 0; }}
header {{ position: sticky; top: 0; background: #fafafa; padding: 6px 10px;
  border-bottom: 1px solid #ccc; z-index: 1; }}
.key {{ padding: 2px 6px; border: 1px solid #999; border-radius: 4px; margin-right: 4px; }}
#details {{ position: fixed; right: 10px; top: 50px; width: 340px; background: #fff;
  border: 1px solid #999; padding: 8px; font-size: 12px; white-space: pre-wrap;
  word-break: break-all; }}
.box {{ cursor: pointer; }}
.box.hit rect {{ stroke: #d00; stroke-width: 3; }}
</style></head>
<body data-status="loading">
<header><b>{title}</b> {legend}
<input id="search" placeholder="find a node by name" size="30"></header>
<div id="details">hover a box for its details</div>
{svg}
<script>
window.addEventListener("error", function (event) {{
  document.body.dataset.status = "error: " + event.message;
}});
(function () {{
  var details = document.getElementById("details");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("g.box"));
  boxes.forEach(function (box) {{
    box.addEventListener("mouseenter", function () {{
      var info = JSON.parse(box.dataset.details);
      details.textContent = Object.keys(info).map(function (k) {{
        return k + ": " + info[k];
      }}).join("\\n");
    }});
  }});
  document.getElementById("search").addEventListener("input", function (event) {{
    var wanted = event.target.value.toLowerCase();
    var first = null;
    boxes.forEach(function (box) {{
      var hit = wanted && box.dataset.name.toLowerCase().indexOf(wanted) >= 0;
      box.classList.toggle("hit", Boolean(hit));
      if (hit && !first) {{ first = box; }}
    }});
    if (first) {{ first.scrollIntoView({{block: "center", inline: "center"}}); }}
  }});
  document.body.dataset.boxes = String(boxes.length);
  document.body.dataset.quantized = String(
    document.querySelectorAll("g.box.quantized").length);
  if (document.body.dataset.status === "loading") {{ document.body.dataset.status = "ready"; }}
}})();
</script>
</body></html>
"""
