"""Finding what a rotation may act on in an exported transformer graph (after fusion).

Three structures, each found from the dataflow alone (node names are not read):

- ``ResidualStream``: the chain of ``Add`` s that carries a pre-norm transformer's hidden state
  from its root (an embedding ``Gather``, a graph input, any tensor) to its end (the final norm,
  a graph output). Each stream tensor may be read only by an RMS norm over the last axis
  (``SimplifiedLayerNormalization``, ``RMSNormalization``), by the next ``Add``, by ``Shape``,
  or be the graph's output: these commute with ``x -> x R`` for orthogonal ``R`` once the norm's
  gamma is folded away (``||x R|| = ||x||``). The other input of each ``Add`` is a branch (an
  attention or MLP output, written by ``o_proj`` or ``down_proj``).
- ``HeadRegion``: a value projection's output followed, head by head, to an output
  projection: ``MatMul(x, Wv)`` (plus a constant bias) -> a ``Reshape`` that splits the last
  axis into ``[heads, head_dim]`` -> ops that never mix the last axis (``Transpose`` keeping it
  last, ``Unsqueeze``/``Expand``/``Reshape`` of outer axes, the value side of ``MatMul(P, V)``)
  -> a ``Reshape`` merging ``[heads, head_dim]`` -> ``MatMul(., Wo)``. Every tensor on the way
  has that one reader, so a rotation of each head's ``head_dim`` coordinates passes through.
  Query heads sharing a key-value head (GQA) read the same rotated rows.
- ``MlpInput``: the input of an MLP's down projection: a ``MatMul`` with a constant weight whose
  input comes from an elementwise op (SwiGLU's product, GELU) and whose output (plus a bias)
  is added to a residual. Its ``Q^T`` folds into the weight; ``Q`` is applied online.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

RMS_NORMS = frozenset({"SimplifiedLayerNormalization", "RMSNormalization"})
"""Norms without a mean subtraction, over the last axis; input 1 is gamma."""
ELEMENTWISE_ACTIVATIONS = frozenset(
    {"Mul", "Gelu", "FastGelu", "Relu", "Sigmoid", "Tanh", "Erf", "Div", "Softplus"}
)
"""Producers that mark a MatMul's input as an MLP's hidden activation."""
SHAPE_READERS = frozenset({"Shape"})
"""Readers that see a tensor's shape only (unchanged by a rotation)."""


@dataclasses.dataclass
class ResidualStream:
    """A residual stream of ``width`` channels, from ``values[0]`` to ``values[-1]``."""

    values: list[ir.Value]
    norms: list[ir.Node]
    adds: list[tuple[ir.Node, int]]
    """Each residual ``Add`` and the index of its branch input (the one not on the stream)."""

    @property
    def width(self) -> int:
        return int(self.values[0].shape[-1])

    @property
    def embedding(self) -> ir.Node | None:
        """The ``Gather`` from a constant ``[vocabulary, width]`` table that starts the stream."""
        producer = self.values[0].producer()
        if producer is None or producer.op_type != "Gather" or producer.domain != "":
            return None
        table = producer.inputs[0]
        if producer.attributes.get_int("axis", 0) != 0 or not is_constant_matrix(table):
            return None
        return producer


@dataclasses.dataclass(frozen=True)
class HeadRegion:
    """A value projection, the output projection reading it, and the head layout between."""

    value_projection: ir.Node
    value_bias: ir.Node | None
    """A constant ``Add`` after the value projection, or None."""
    output_projection: ir.Node
    head_dim: int


def is_constant_matrix(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and not value.is_graph_input()
        and len(value.const_value.shape) == 2
        and value.const_value.dtype == ir.DataType.FLOAT
    )


def weight_reader(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` is ``MatMul(value, W)`` with a constant float matrix ``W``."""
    return (
        node.op_type == "MatMul"
        and node.domain == ""
        and node.inputs[0] is value
        and node.inputs[1] is not value
        and is_constant_matrix(node.inputs[1])
    )


def only_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value``'s data, once (None if more, none, or a graph output);
    ``Shape`` readers do not count: a rotation keeps the shape."""
    uses = [node for node, _ in value.uses() if node.op_type not in SHAPE_READERS]
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0]


def bias_after(node: ir.Node) -> ir.Node | None:
    """The ``Add`` of a constant vector that is the one reader of ``node``'s output, or None."""
    reader = only_reader(node.outputs[0])
    if reader is None or reader.op_type != "Add" or reader.domain != "":
        return None
    other = reader.inputs[1] if reader.inputs[0] is node.outputs[0] else reader.inputs[0]
    if other is None or other.const_value is None or len(other.const_value.shape) != 1:
        return None
    return reader


# Residual streams.


def residual_streams(graph: ir.Graph) -> list[ResidualStream] | str:
    """Every residual stream of ``graph``, or why it has none a rotation can act on."""
    starts = [n.inputs[0] for n in graph if n.op_type in RMS_NORMS and n.domain == ""]
    if not starts:
        has_layer_norm = any(n.op_type == "LayerNormalization" for n in graph)
        return (
            "its norms are LayerNormalization, which subtracts the mean: a rotation of the "
            "residual stream would need that stream made zero-mean first (not done)"
            if has_layer_norm
            else "it has no RMS norm (SimplifiedLayerNormalization, RMSNormalization)"
        )
    streams: list[ResidualStream] = []
    covered: set[ir.Value] = set()
    for start in starts:
        if start in covered:
            continue
        stream = _follow(start)
        if isinstance(stream, str):
            return stream
        streams.append(stream)
        covered.update(stream.values)
    return streams


def _follow(root: ir.Value) -> ResidualStream | str:
    """The stream from ``root`` along its ``Add`` s, or why a tensor on it blocks rotation."""
    stream = ResidualStream([root], [], [])
    value = root
    while True:
        step = _step(value, stream)
        if isinstance(step, str):
            return step
        if step is None:
            return stream
        add, branch = step
        stream.adds.append((add, branch))
        value = add.outputs[0]
        stream.values.append(value)


def _step(value: ir.Value, stream: ResidualStream) -> tuple[ir.Node, int] | str | None:
    """Record ``value``'s norms; the ``Add`` it continues into (and its branch input), None at
    the stream's end, or why one of its readers blocks rotation."""
    adds = []
    for node, index in value.uses():
        if node.op_type in RMS_NORMS and node.domain == "" and index == 0:
            problem = _norm_problem(node)
            if problem:
                return problem
            stream.norms.append(node)
        elif node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
            adds.append((node, 1 - index))
        elif node.op_type not in SHAPE_READERS:
            return (
                f"residual stream tensor '{value.name}' is read by {node.op_type} "
                f"'{node.name}', which does not commute with a rotation"
            )
    if len(adds) > 1:
        return f"residual stream tensor '{value.name}' is read by {len(adds)} Adds"
    if not adds:
        return None
    if value.is_graph_output():
        return f"residual stream tensor '{value.name}' is a graph output before the stream ends"
    add, branch = adds[0]
    if add.inputs[branch] is value or add.inputs[branch].const_value is not None:
        return f"Add '{add.name}' adds a constant or the stream to itself"
    return add, branch


def _norm_problem(node: ir.Node) -> str | None:
    gamma = node.inputs[1] if len(node.inputs) > 1 else None
    if gamma is None or gamma.const_value is None or len(gamma.const_value.shape) != 1:
        return f"{node.op_type} '{node.name}' has no constant gamma vector"
    if node.attributes.get_int("axis", -1) not in (-1, len(node.inputs[0].shape or ()) - 1):
        return f"{node.op_type} '{node.name}' does not normalize the last axis"
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return f"{node.op_type} '{node.name}' has its statistics outputs read"
    return None


# Attention heads.


def head_regions(graph: ir.Graph) -> list[HeadRegion]:
    """Every value-projection -> output-projection pair with a head layout between them."""
    regions = []
    for node in graph:
        if node.op_type == "MatMul" and is_constant_matrix(node.inputs[1]):
            region = _head_region(node)
            if region is not None:
                regions.append(region)
    return regions


def _head_region(projection: ir.Node) -> HeadRegion | None:
    value, bias = projection.outputs[0], bias_after(projection)
    if bias is not None:
        value = bias.outputs[0]
    width = _last_dim(value)
    split = only_reader(value)
    if width is None or split is None or split.op_type != "Reshape":
        return None
    head_dim = _last_dim(split.outputs[0])
    if head_dim is None or head_dim >= width or width % head_dim:
        return None
    value = split.outputs[0]
    while True:
        reader = only_reader(value)
        if reader is None:
            return None
        if reader.op_type == "Reshape" and _last_dim(reader.outputs[0]) != head_dim:
            return _merged(projection, bias, reader, head_dim)
        if not _keeps_last_axis(reader, value, head_dim):
            return None
        value = reader.outputs[0]


def _merged(
    projection: ir.Node, bias: ir.Node | None, merge: ir.Node, head_dim: int
) -> HeadRegion | None:
    """The region ending in ``merge`` if an output projection reads it; the merged width is
    its weight's row count (the Reshape's own last dimension may be unknown)."""
    output = only_reader(merge.outputs[0])
    if output is None or not weight_reader(output, merge.outputs[0]):
        return None
    width = output.inputs[1].const_value.shape[0]
    if width % head_dim or _last_dim(merge.outputs[0]) not in (None, width):
        return None
    return HeadRegion(projection, bias, output, head_dim)


def _keeps_last_axis(node: ir.Node, value: ir.Value, head_dim: int) -> bool:
    """Whether ``node`` reads ``value`` (last axis ``head_dim``) without mixing that axis."""
    if node.domain != "" or _last_dim(node.outputs[0]) != head_dim:
        return False
    rank = len(node.outputs[0].shape)
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == len(perm) - 1
    if node.op_type == "MatMul":
        return node.inputs[1] is value and node.inputs[0] is not value
    if node.op_type == "Unsqueeze":
        axes = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
        return axes is not None and all(a % rank != rank - 1 for a in axes.numpy().tolist())
    return node.op_type in ("Reshape", "Expand", "Identity") and node.inputs[0] is value


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


# MLP inputs.


def mlp_inputs(graph: ir.Graph) -> list[ir.Node]:
    """Down projections: ``MatMul(h, W)``, ``h`` from an elementwise op, the output (plus a bias)
    added to a residual."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or not weight_reader(node, node.inputs[0]):
            continue
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type not in ELEMENTWISE_ACTIVATIONS:
            continue
        width = _last_dim(node.inputs[0])
        if width is not None and width > 1 and _feeds_residual(node):
            found.append(node)
    return found


def _feeds_residual(node: ir.Node) -> bool:
    bias = bias_after(node)
    output = (bias or node).outputs[0]
    reader = only_reader(output)
    if reader is None or reader.op_type != "Add" or reader.domain != "":
        return False
    return all(v is not None and v.const_value is None for v in reader.inputs)
