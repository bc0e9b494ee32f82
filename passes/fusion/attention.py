"""Attention over a KV cache, as exporters write it out, to onnxruntime's GroupQueryAttention.

A decoder layer's attention as torch's dynamo exporter writes transformers' eager attention
(B batch, S new tokens, P cached ones, T = P + S, Hq query heads, Hkv key-value heads each
shared by G = Hq / Hkv of them, D channels a head)::

    q_h = Transpose(Reshape(q, [B, S, Hq, D]), [0, 2, 1, 3])       (k_h, v_h alike, Hkv heads)
    rope(x) = x * cos4 + Concat(-x[..., D/2:], x[..., :D/2]) * sin4
    K = Concat(past_key, rope(k_h), axis=2);  V = Concat(past_value, v_h, axis=2)    (present)
    K_g = Reshape(Expand(Unsqueeze(K, 2), [B, Hkv, G, T, D]), [B, Hq, T, D])   (V_g alike; or
                                                                          K itself when G = 1)
    out = Reshape(Transpose(Softmax(rope(q_h) K_g^T * scale + mask) V_g, [0, 2, 1, 3]),
                  [B, S, Hq * D])

  -> out, K, V = GroupQueryAttention(RotaryEmbedding(q), RotaryEmbedding(k), v, past_key,
                                     past_value, ..., attention_bias=mask)

Query head h reads key-value head h // G in both: the Unsqueeze at axis 2 puts the group index
after the key-value head's. The scale may also be a division, or absent (1).

Rotation. ``cos4 = Unsqueeze(cos, 1)`` with ``cos = Cos(Concat(f, f))`` (times a constant, or
not), the same D/2 angles twice over, and ``sin`` alike from the same ``f``. With
c = cos[.., i] = cos[.., i + D/2] and s alike, for i < D/2::

    rope(x)_i = x_i c - x_(i+D/2) s,    rope(x)_(i+D/2) = x_(i+D/2) c + x_i s

which is the kernel's rotation (not interleaved) with ``cos_cache[p] = c`` at position p. Two
forms, the first where it can be built:

- Inside the kernel (``do_rotary=1``): ``cos_cache``/``sin_cache`` are tables of every position
  below the model's context length (its ``qgraph.generation.context_length`` metadata), made by
  running the exporter's own angle subgraph in onnxruntime on positions 0 .. L - 1, and the
  kernel reads the position input itself. So the numbers are the ones the graph computes, as
  long as the angles of a token depend on its position alone: the subgraph must read one
  [B, S] int64 input and nothing else, and a probe batch of scattered positions must give the
  table's rows. With ``query_seqlens`` given, onnxruntime 1.32 rotates each token by its own
  ``position_ids`` entry, prefill included (without it, a prompt's first position only), and
  refuses a position past the table. The kernel rotates heads of a multiple of 16 channels.
  This saves a step two RotaryEmbedding nodes a layer, and lets a packed q|k|v reach the
  kernel without a Split (``packing``).
- Otherwise com.microsoft ``RotaryEmbedding`` before the kernel, whose caches are the
  exporter's own [B, S, D/2] first halves as B * S rows, the position of token (b, s) being its
  row, b * S + s: no maximum context is baked in.

Masking. The exporter's mask goes in as ``attention_bias``, added to the scaled scores as
before; every row has T keys (``seqlens_k = T - 1``, ``total_sequence_length = T``) and S
queries (``query_seqlens = S``). onnxruntime 1.32's CPU kernel takes ``query_seqlens`` (without
which it refuses several new tokens over a cache in a batch of more than one) only with
``causal=1``, which hides key k from query s when k > P + s on top of the bias. So the rewrite
requires the mask to hide those keys already, and checks it: the mask's subgraph is run in
onnxruntime for a prefill (S = 4, P = 0) and a continuation (S = 3, P = 5) of one all-ones
row, and every future key must sit below -1e30 (where exp underflows to 0 for any score). Then
the fused graph computes what the exported one does, left padding included, except in query
rows that see no key at all (left-padding queries of a prefill): there the exporter averages
every value and the kernel only the causal ones; both are meaningless.

The rewrite applies where the target runs the com.microsoft domain, the dtype is float32, a
mask is added (without one the exported attention is not causal, and the kernel would make it
so), the shapes the exporter recorded say the heads and channels above, and every matched node
but the cache Concats is read only inside the match. Products and sums may have their operands
in either order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.generation import CONTEXT_LENGTH_KEY
from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.graph.traversal import carry_metadata
from qgraph.passes.fusion.rules import constant, scalar
from qgraph.passes.rule_table import NearMiss, label
from qgraph.targets import TargetSpec
from qgraph.targets.runtime import ORT_LIMITS
from qgraph.verify import run

RULE_NAME = "group-query-attention"
SUMMARY = "attention over a KV cache -> GroupQueryAttention (rotating inside where it can)"
HEADS_PERM = (0, 2, 1, 3)
KEYS_PERM = (0, 1, 3, 2)
CACHE_AXES = (2, -2)
CAUSALITY_PROBES = ((4, 0), (3, 5))
"""(new tokens S, cached tokens P) at which the mask is checked to hide later keys."""
HIDDEN = -1e30
"""A bias at or below this leaves exp(score + bias) = 0 in float32 for any finite score."""
MAX_MASK_NODES = 200
ROTARY_HEAD_MULTIPLE = 16
"""onnxruntime's GroupQueryAttention rotates (``do_rotary``) heads of a multiple of 16 channels."""
ROTARY_PROBE = ((7, 0, 3), (2, 2, 11))
"""Scattered positions (batch 2, 3 tokens) whose angles must be the table's rows."""
ROTARY_ATOL = 1e-6
"""Angle tables agree to float32 rounding of a cosine or sine: |values| <= 1, eps 1.2e-7."""


class NoMatch(Exception):
    """The subgraph is not the attention above; the message says where it differs."""


class NotACandidate(NoMatch):
    """The Softmax is no attention's (no Q K^T product under it): not worth a near-miss."""


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The exporter's rotary angles, [B, S, D] each, shared by a layer's query and key."""

    cos: ir.Value
    sin: ir.Value


@dataclasses.dataclass(frozen=True)
class RotaryTable:
    """Angles of every position below the context, [L, D/2] each, and the [B, S] int64 input
    the exporter computes them from."""

    positions: ir.Value
    cos: ir.Value
    sin: ir.Value


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """One layer's attention, as the module docstring draws it."""

    query: ir.Value
    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    mask: ir.Value | None
    rotation: Rotation
    scale: float
    num_heads: int
    kv_num_heads: int
    head_size: int
    output: ir.Value
    nodes: tuple[ir.Node, ...]


def wanted(target: TargetSpec) -> bool:
    """Whether ``target`` runs the ops this rewrite emits."""
    return MICROSOFT_DOMAIN in target.runtime.allowed_domains


def fuse_attention(model: ir.Model) -> tuple[int, tuple[NearMiss, ...]]:
    """Rewrite every matching attention of ``model``; (rewrites, near-misses with reasons)."""
    graph = model.graph
    shared = _SharedInputs(graph, _context_length(model))
    causal_masks: dict[ir.Value, str | None] = {}
    count, misses = 0, []
    for softmax in [node for node in graph if node.op_type == "Softmax"]:
        try:
            match = match_attention(softmax)
            _require(match.mask is not None, "no mask is added: the kernel would add a causal one")
            if match.mask not in causal_masks:
                causal_masks[match.mask] = _causality_problem(graph, match)
            _require(causal_masks[match.mask] is None, str(causal_masks[match.mask]))
        except NotACandidate:
            continue
        except NoMatch as reason:
            misses.append(NearMiss(RULE_NAME, label(softmax), str(reason)))
            continue
        table = shared.rotary_table(match.rotation, match.head_size)
        if not isinstance(table, str) and not _tokens_alike(table.positions, match.query):
            table = f"the positions '{table.positions.name}' are not [B, S] of the query"
        if isinstance(table, str):
            misses.append(NearMiss(RULE_NAME, label(softmax), f"rotation kept outside: {table}"))
            table = None
        _replace(graph, match, shared, table)
        count += 1
    return count, tuple(misses)


def _tokens_alike(value: ir.Value, query: ir.Value) -> bool:
    """Whether ``value`` starts [B, S] with the query's B and S, dims the exporter named alike
    (the kernels read one angle row, or position, per token of the query)."""
    dims = list(value.shape or ())[:2], list(query.shape or ())[:2]
    named = all(isinstance(d, int) or d.value is not None for d in dims[0])
    return len(dims[0]) == 2 and dims[0] == dims[1] and named


def _context_length(model: ir.Model) -> int | None:
    text = model.metadata_props.get(CONTEXT_LENGTH_KEY)
    return int(text) if text is not None and text.isdigit() and int(text) > 0 else None


def match_attention(softmax: ir.Node) -> AttentionMatch:
    """The attention around ``softmax``, or ``NoMatch`` saying what differs."""
    nodes: list[ir.Node] = [softmax]
    try:
        scores, mask, scale = _scores(softmax.inputs[0], nodes)
        product = _node(scores, "MatMul", nodes)
    except NoMatch as reason:
        raise NotACandidate(str(reason)) from None
    _require(_last_axis(softmax), "the Softmax is not over the last axis", softmax)
    query_rotated, keys_t = product.inputs
    grouped_keys = _node(keys_t, "Transpose", nodes, perm=KEYS_PERM).inputs[0]
    output, grouped_values = _output(softmax, nodes)
    present_key = _ungrouped(grouped_keys, nodes)
    present_value = _ungrouped(grouped_values, nodes)
    past_key, key_rotated = _cache_concat(present_key, nodes)
    past_value, value_heads = _cache_concat(present_value, nodes)
    query_heads, rotation = _rotated(query_rotated, nodes)
    key_heads, key_rotation = _rotated(key_rotated, nodes)
    _require(rotation == key_rotation, "query and key rotate by different angles", product)
    query, num_heads, head_size = _split_heads(query_heads, nodes)
    key, kv_num_heads, _ = _split_heads(key_heads, nodes)
    value, _, _ = _split_heads(value_heads, nodes)
    match = AttentionMatch(
        query, key, value, past_key, past_value, present_key, present_value, mask, rotation,
        scale, num_heads, kv_num_heads, head_size, output, tuple(nodes),
    )  # fmt: skip
    _check(match)
    return match


def _require(condition: bool, reason: str, where: ir.Node | ir.Value | None = None) -> None:
    if not condition:
        raise NoMatch(reason if where is None else f"{reason} ({_where(where)})")


def _where(item: ir.Node | ir.Value) -> str:
    return label(item) if isinstance(item, ir.Node) else f"'{item.name}'"


def _node(
    value: ir.Value, op_type: str, nodes: list[ir.Node], perm: tuple[int, ...] | None = None
) -> ir.Node:
    """The producer of ``value`` if it is a default-domain ``op_type`` (with this ``perm``, for
    a Transpose); added to ``nodes``."""
    node = value.producer()
    _require(
        node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"),
        f"'{value.name}' does not come from a {op_type}",
    )
    if perm is not None:
        actual = node.attributes.get_ints("perm", None)
        _require(tuple(actual or ()) == perm, f"its perm is {actual}, not {list(perm)}", node)
    nodes.append(node)
    return node


def _last_axis(node: ir.Node) -> bool:
    axis = node.attributes.get_int("axis", -1)
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    return axis == -1 or axis == (rank or 0) - 1


def _scores(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value | None, float]:
    """(the Q K^T product, the additive mask or None, the scale) under the Softmax."""
    mask = None
    producer = value.producer()
    if producer is not None and producer.op_type == "Add":
        nodes.append(producer)
        value, mask = _computed_first(producer.inputs)
    producer = value.producer()
    if producer is not None and producer.op_type in ("Mul", "Div"):
        nodes.append(producer)
        value, factor = _computed_first(producer.inputs)
        scale = scalar(factor)
        _require(scale is not None and scale != 0, "the scale is not a constant", producer)
        return value, mask, scale if producer.op_type == "Mul" else 1.0 / scale
    return value, mask, 1.0


def _computed_first(inputs: Iterable[ir.Value | None]) -> tuple[ir.Value, ir.Value]:
    """The pair reordered so that the one a MatMul (or a scale of one) makes comes first."""
    first, second = inputs
    producer = second.producer() if second is not None else None
    if producer is not None and producer.op_type in ("MatMul", "Mul", "Div"):
        return second, first
    return first, second


def _output(softmax: ir.Node, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """(the attention's [B, S, Hq * D] output, the grouped values) after the Softmax."""
    product = _only_reader(softmax.outputs[0], "MatMul", nodes)
    _require(product.inputs[0] is softmax.outputs[0], "the probabilities are not on the left")
    transpose = _only_reader(product.outputs[0], "Transpose", nodes)
    _require(tuple(transpose.attributes.get_ints("perm", ())) == HEADS_PERM, "heads stay")
    merge = _only_reader(transpose.outputs[0], "Reshape", nodes)
    return merge.outputs[0], product.inputs[1]


def _only_reader(value: ir.Value, op_type: str, nodes: list[ir.Node]) -> ir.Node:
    readers = [user for user, _ in value.uses()]
    _require(
        len(readers) == 1 and readers[0].op_type == op_type and not value.is_graph_output(),
        f"'{value.name}' is not read by one {op_type} alone",
    )
    nodes.append(readers[0])
    return readers[0]


def _ungrouped(grouped: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """The cache tensor [B, Hkv, T, D] that ``grouped`` repeats G times per head (itself when
    it is no Reshape of an Expand of an Unsqueeze at axis 2)."""
    producer = grouped.producer()
    if producer is None or producer.op_type != "Reshape":
        return grouped
    expand = _node(producer.inputs[0], "Expand", nodes)
    unsqueeze = _node(expand.inputs[0], "Unsqueeze", nodes)
    axes = constant(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    _require(axes is not None and axes.tolist() == [2], "the heads are not repeated", unsqueeze)
    nodes.append(producer)
    return unsqueeze.inputs[0]


def _cache_concat(present: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """(past, new) of ``present = Concat(past, new)`` along the sequence axis."""
    node = present.producer()
    _require(
        node is not None and node.op_type == "Concat",
        f"no KV cache: the keys and values '{present.name}' are no Concat(past, new)",
    )
    nodes.append(node)
    _require(node.attributes.get_int("axis", 0) in CACHE_AXES, "it is not along axis 2", node)
    _require(len(node.inputs) == 2, "it joins more than a past and a new part", node)
    return node.inputs[0], node.inputs[1]


def _rotated(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, Rotation]:
    """(x, its angles) for ``value = x * cos4 + rotate_half(x) * sin4``."""
    add = _node(value, "Add", nodes)
    products = [_angle_product(_node(v, "Mul", nodes)) for v in add.inputs]
    products.sort(key=lambda product: _is_concat(product[0]))
    (x, cos4), (half_turn, sin4) = products
    concat = _node(half_turn, "Concat", nodes)
    _require(concat.attributes.get_int("axis", 0) in (-1, 3), "not the last axis", concat)
    negated, lower = concat.inputs
    upper = _node(negated, "Neg", nodes).inputs[0]
    head_size = _last_dim(x)
    _require(_is_half(upper, x, head_size, upper=True, nodes=nodes), "no upper half", concat)
    _require(_is_half(lower, x, head_size, upper=False, nodes=nodes), "no lower half", concat)
    return x, Rotation(_angles(cos4, "Cos"), _angles(sin4, "Sin"))


def _angle_product(mul: ir.Node) -> tuple[ir.Value, ir.Value]:
    """(operand, angles) of ``mul``, in either order: the angles are an Unsqueeze's."""
    first, second = mul.inputs
    producer = first.producer()
    if producer is not None and producer.op_type == "Unsqueeze":
        return second, first
    return first, second


def _is_concat(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "Concat"


def _last_dim(value: ir.Value) -> int:
    shape = value.shape
    _require(shape is not None and isinstance(shape[-1], int), f"'{value.name}': shape unknown")
    return shape[-1]


def _is_half(half: ir.Value, x: ir.Value, size: int, *, upper: bool, nodes: list[ir.Node]) -> bool:
    """Whether ``half`` is ``x[..., size/2:]`` (``upper``) or ``x[..., :size/2]``."""
    node = half.producer()
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x:
        return False
    starts, ends, axes, *steps = (constant(v) for v in node.inputs[1:])
    bounds = (size // 2, size) if upper else (0, size // 2)
    if any(a is None or a.size != 1 for a in (starts, ends, axes)):
        return False
    if steps and (steps[0] is None or steps[0].tolist() != [1]):
        return False
    if int(axes[0]) not in (-1, 3) or int(starts[0]) != bounds[0]:
        return False
    nodes.append(node)
    return min(int(ends[0]), size) == bounds[1]


def _angles(value4: ir.Value, trig: str) -> ir.Value:
    """The [B, S, D] angles tensor under ``value4 = Unsqueeze(angles, 1)``, after checking it
    is ``trig`` of D/2 angles twice over (times a constant, or not). The Unsqueeze is not part
    of the match: every layer reads it."""
    unsqueeze = value4.producer()
    _require(unsqueeze is not None and unsqueeze.op_type == "Unsqueeze", "no Unsqueeze", value4)
    axes = constant(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    _require(axes is not None and axes.tolist() == [1], "not unsqueezed at axis 1", unsqueeze)
    angles = unsqueeze.inputs[0]
    node = angles.producer()
    scaled = node is not None and node.op_type == "Mul"
    if scaled and any(scalar(v) is not None for v in node.inputs):
        node = next(v for v in node.inputs if scalar(v) is None).producer()
    _require(node is not None and node.op_type == trig, f"the angles are not a {trig}", angles)
    doubled = node.inputs[0].producer()
    _require(
        doubled is not None
        and doubled.op_type == "Concat"
        and len(doubled.inputs) == 2
        and doubled.inputs[0] is doubled.inputs[1],
        f"the {trig} is not of the same angles twice over",
        node,
    )
    shape = angles.shape
    _require(shape is not None and len(shape) == 3, f"'{angles.name}' is not [B, S, D]")
    return angles


def _split_heads(heads: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, int, int]:
    """(x, heads, channels) for ``heads = Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3])``."""
    transpose = _node(heads, "Transpose", nodes, perm=HEADS_PERM)
    reshape = _node(transpose.inputs[0], "Reshape", nodes)
    x, split = reshape.inputs[0], reshape.outputs[0]
    _require(
        x.shape is not None and split.shape is not None and len(x.shape) == 3,
        f"'{x.name}' is not [B, S, H * D]",
    )
    count, size = split.shape[2], split.shape[3] if len(split.shape) == 4 else None
    _require(
        isinstance(count, int) and isinstance(size, int) and x.shape[-1] == count * size,
        f"'{split.name}' is not [B, S, H, D] with H * D = {x.shape[-1]}",
    )
    return x, count, size


def _check(match: AttentionMatch) -> None:
    """What the kernel needs beyond the structure, and nothing read outside the match."""
    _require(match.query.dtype == ir.DataType.FLOAT, "not float32", match.query)
    _require(match.num_heads % match.kv_num_heads == 0, "query heads not in whole groups")
    _require(
        _tokens_alike(match.rotation.cos, match.query),
        f"the angles '{match.rotation.cos.name}' are not one row per token of the query",
    )
    for past in (match.past_key, match.past_value):
        shape = past.shape
        _require(
            shape is not None and len(shape) == 4 and shape[1] == match.kv_num_heads,
            f"the cache '{past.name}' is not [B, {match.kv_num_heads}, P, {match.head_size}]",
        )
    if match.mask is not None:
        shape = match.mask.shape
        _require(
            shape is not None and len(shape) == 4 and shape[1] == 1,
            f"the mask '{match.mask.name}' is not [B, 1, S, T]",
        )
    inside = set(match.nodes)
    kept = {match.output, match.present_key, match.present_value}
    for node in inside:
        for value in node.outputs:
            if value in kept:
                continue
            outside = [user for user, _ in value.uses() if user not in inside]
            _require(not outside and not value.is_graph_output(), "read elsewhere too", value)


def _causality_problem(graph: ir.Graph, match: AttentionMatch) -> str | None:
    """Why the mask may let a query see a later key (None if the probes say it cannot).

    The inputs the mask reads get batch 1, the query's S, the cache's P, and T = P + S for any
    other dim: a wrong guess fails to run or to broadcast to [1, 1, S, T], never passes."""
    mask = match.mask
    nodes = _ancestry(graph, mask)
    if nodes is None:
        return f"the mask '{mask.name}' is computed by more than {MAX_MASK_NODES} nodes"
    inputs = _graph_inputs(nodes)
    model = _subgraph_model(graph, nodes, inputs, [mask])
    for new, past in CAUSALITY_PROBES:
        sizes = {
            str(match.query.shape[0]): 1,
            str(match.query.shape[1]): new,
            str(match.past_key.shape[2]): past,
        }
        feeds = {
            v.name: np.ones(
                [d if isinstance(d, int) else sizes.get(str(d), past + new) for d in v.shape],
                v.dtype.numpy(),
            )
            for v in inputs
            if v.shape is not None
        }
        try:
            bias = run(model, feeds)[mask.name]
            bias = np.broadcast_to(bias, (1, 1, new, past + new))
        except Exception as error:  # onnxruntime raises several types; any is a refusal
            return f"the mask '{mask.name}' could not be probed: {str(error)[:120]}"
        future = np.triu(np.ones((new, past + new), bool), k=past + 1)
        if not np.all(bias[0, 0][future] <= HIDDEN):
            return f"the mask '{mask.name}' lets queries see later keys (S = {new}, P = {past})"
    return None


def _ancestry(graph: ir.Graph, value: ir.Value) -> list[ir.Node] | None:
    """The nodes that compute ``value`` from graph inputs and constants, in graph order
    (None if more than ``MAX_MASK_NODES``)."""
    found: dict[ir.Node, None] = {}
    pending = [value]
    while pending:
        node = pending.pop().producer()
        if node is None or node in found:
            continue
        found[node] = None
        if len(found) > MAX_MASK_NODES:
            return None
        pending.extend(v for v in node.inputs if v is not None)
    return [node for node in graph if node in found]


def _graph_inputs(nodes: Iterable[ir.Node]) -> set[ir.Value]:
    return {v for n in nodes for v in n.inputs if v is not None and v.is_graph_input()}


def _subgraph_model(
    graph: ir.Graph, nodes: list[ir.Node], inputs: set[ir.Value], outputs: list[ir.Value]
) -> bytes:
    """A model of ``nodes`` alone, reading ``inputs`` (any shape) and returning ``outputs``."""
    read = {v for n in nodes for v in n.inputs if v is not None}
    initializers = [ir.serde.serialize_tensor(v.const_value) for v in read if v.is_initializer()]
    proto = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "subgraph",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in outputs],
        initializer=initializers,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()]
    model = onnx.helper.make_model(proto, opset_imports=opsets)
    model.ir_version = ORT_LIMITS.max_ir_version
    return model.SerializeToString()


class _SharedInputs:
    """Values every layer's attention reads alike, built once and inserted after what they
    read: the rotary caches and their row numbers per angles tensor, the key counts per mask."""

    def __init__(self, graph: ir.Graph, context_length: int | None) -> None:
        self.graph = graph
        self.context_length = context_length
        self._built: dict[tuple[str, ir.Value, ...], tuple[ir.Value, ...]] = {}
        self._tables: dict[Rotation, RotaryTable | str] = {}

    def rotary_table(self, rotation: Rotation, head_size: int) -> RotaryTable | str:
        """The position tables of ``rotation`` (module docstring), or why there are none."""
        if rotation not in self._tables:
            self._tables[rotation] = self._build_table(rotation, head_size)
        return self._tables[rotation]

    def _build_table(self, rotation: Rotation, head_size: int) -> RotaryTable | str:
        if self.context_length is None:
            return f"the model's metadata has no {CONTEXT_LENGTH_KEY}"
        if head_size % ROTARY_HEAD_MULTIPLE:
            return f"heads of {head_size} channels, not a multiple of {ROTARY_HEAD_MULTIPLE}"
        subgraph = _angle_subgraph(self.graph, rotation)
        if isinstance(subgraph, str):
            return subgraph
        model, position = subgraph
        every = np.arange(self.context_length, dtype=np.int64)[None]
        probe = np.minimum(np.array(ROTARY_PROBE, np.int64), self.context_length - 1)
        half = head_size // 2
        try:
            tables = [a[0, :, :half] for a in _angles_at(model, rotation, position, every)]
            probed = [a[..., :half] for a in _angles_at(model, rotation, position, probe)]
        except Exception as error:  # onnxruntime raises several types; any is a refusal
            return f"the angles could not be computed: {str(error)[:120]}"
        pairs = zip(probed, tables, strict=True)
        if not all(np.allclose(p, t[probe], atol=ROTARY_ATOL, rtol=0) for p, t in pairs):
            return "a token's angles depend on more than its own position"
        cos, sin = (self._register(f"rotary_{kind}_table", table) for kind, table in
                    zip(("cos", "sin"), tables, strict=True))  # fmt: skip
        return RotaryTable(position, cos, sin)

    def _register(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array.astype(np.float32))
        value = ir.Value(name=f"{name}_{len(self._tables)}", const_value=tensor)
        value.const_value.name = value.name
        self.graph.register_initializer(value)
        return value

    def caches(self, rotation: Rotation, head_size: int) -> tuple[ir.Value, ...]:
        """(position_ids, cos_cache, sin_cache) for RotaryEmbedding."""
        key = ("rotary", rotation.cos, rotation.sin)
        if key not in self._built:
            tape = ir.tape.Tape()
            rows = tape.op("Shape", [rotation.cos], attributes={"start": 0, "end": 2})
            count = tape.op("ReduceProd", [rows], attributes={"keepdims": 0})
            numbers = tape.op("Range", [_constant(tape, 0), count, _constant(tape, 1)])
            positions = tape.op("Reshape", [numbers, rows])
            halves = [_first_half_rows(tape, a, head_size) for a in (rotation.cos, rotation.sin)]
            self._insert(tape, key, (positions, *halves))
        return self._built[key]

    def key_counts(self, match: AttentionMatch) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(seqlens_k, total_sequence_length, query_seqlens): T - 1 for each of the B rows, T,
        and S for each row, as int32; from the mask's shape when it has the batch's, S's and T's
        dims, else from the layer's inputs."""
        mask = match.mask
        query = match.query.shape
        if mask is not None and (mask.shape[0], mask.shape[2]) == (query[0], query[1]):
            batch_of, new_of, total_dims = mask, (mask, 2), [(mask, 3)]
        else:
            batch_of, new_of = match.query, (match.query, 1)
            total_dims = [(match.past_key, 2), (match.query, 1)]
        key = ("lengths", batch_of, *(value for value, _ in total_dims))
        if key not in self._built:
            tape = ir.tape.Tape()
            parts = [_dim(tape, value, axis) for value, axis in total_dims]
            total = _int32(tape, parts[0] if len(parts) == 1 else tape.op("Add", parts))
            one = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int32))})
            rows = _dim(tape, batch_of, 0)
            seqlens = tape.op("Expand", [tape.op("Sub", [total, one]), rows])
            queries = tape.op("Expand", [_int32(tape, _dim(tape, *new_of)), rows])
            self._insert(tape, key, (seqlens, tape.op("Squeeze", [total]), queries))
        return self._built[key]

    def _insert(self, tape: ir.tape.Tape, key: tuple, values: tuple[ir.Value, ...]) -> None:
        """Put ``tape``'s nodes right after the last producer of what they read."""
        read = {v for node in tape.nodes for v in node.inputs if v is not None}
        producers = {v.producer() for v in read} - {None, *tape.nodes}
        order = {node: i for i, node in enumerate(self.graph)}
        _name_outputs(tape.nodes, f"{key[0]}_{len(self._built)}")
        if producers:
            self.graph.insert_after(max(producers, key=order.__getitem__), tape.nodes)
        else:
            self.graph.insert_before(next(iter(self.graph)), tape.nodes)
        self._built[key] = values


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _angle_subgraph(graph: ir.Graph, rotation: Rotation) -> tuple[bytes, ir.Value] | str:
    """(a model computing ``rotation``'s cos and sin, the [B, S] int64 input it reads), or why
    there is none."""
    found = _ancestry(graph, rotation.cos), _ancestry(graph, rotation.sin)
    if found[0] is None or found[1] is None:
        return f"the angles are computed by more than {MAX_MASK_NODES} nodes"
    order = {node: i for i, node in enumerate(graph)}
    nodes = sorted(set(found[0]) | set(found[1]), key=order.__getitem__)
    inputs = _graph_inputs(nodes)
    position = next(iter(inputs)) if len(inputs) == 1 else None
    if position is None or position.dtype != ir.DataType.INT64 or _rank(position) != 2:
        return f"the angles read {sorted(v.name for v in inputs)}, not one [B, S] int64 input"
    return _subgraph_model(graph, nodes, inputs, [rotation.cos, rotation.sin]), position


def _angles_at(
    model: bytes, rotation: Rotation, position: ir.Value, positions: np.ndarray
) -> list[np.ndarray]:
    """(cos, sin) as the angle subgraph ``model`` computes them for ``positions``."""
    outputs = run(model, {position.name: positions})
    return [outputs[rotation.cos.name], outputs[rotation.sin.name]]


def _constant(tape: ir.tape.Tape, number: int) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(number, np.int64))})


def _int32(tape: ir.tape.Tape, value: ir.Value) -> ir.Value:
    return tape.op("Cast", [value], attributes={"to": ir.DataType.INT32})


def _dim(tape: ir.tape.Tape, value: ir.Value, axis: int) -> ir.Value:
    return tape.op("Shape", [value], attributes={"start": axis, "end": axis + 1})


def _first_half_rows(tape: ir.tape.Tape, angles: ir.Value, head_size: int) -> ir.Value:
    """``angles[..., :D/2]`` as [B * S, D/2] rows."""
    bounds = [ir.tensor(np.array([v], np.int64)) for v in (0, head_size // 2, -1)]
    bound_values = [tape.op("Constant", [], attributes={"value": t}) for t in bounds]
    sliced = tape.op("Slice", [angles, *bound_values])
    rows = ir.tensor(np.array([-1, head_size // 2], np.int64))
    return tape.op("Reshape", [sliced, tape.op("Constant", [], attributes={"value": rows})])


def _name_outputs(nodes: Iterable[ir.Node], prefix: str) -> None:
    for index, value in enumerate(v for node in nodes for v in node.outputs):
        if not value.name:
            value.name = f"{prefix}_{index}"


def _replace(
    graph: ir.Graph, match: AttentionMatch, shared: _SharedInputs, table: RotaryTable | None
) -> None:
    """Put GroupQueryAttention in ``match``'s place, rotating inside with ``table``, else after
    the query's and key's RotaryEmbedding; its outputs keep the replaced values' names."""
    seqlens, total, query_counts = shared.key_counts(match)
    tape = ir.tape.Tape()
    attributes = {
        "num_heads": match.num_heads,
        "kv_num_heads": match.kv_num_heads,
        "scale": match.scale,
        "causal": 1,
    }
    if table is None:
        query_key = _rotated_outside(tape, match, shared)
        rotary: list[ir.Value | None] = [None, None, None]
    else:
        query_key = [match.query, match.key]
        rotary = [table.cos, table.sin, table.positions]
        attributes["do_rotary"] = 1
    outputs = tape.op_multi_out(
        "GroupQueryAttention",
        [*query_key, match.value, match.past_key, match.past_value, seqlens, total,
         *rotary, match.mask, *[None] * 5, query_counts],
        num_outputs=3,
        domain=MICROSOFT_DOMAIN,
        attributes=attributes,
    )  # fmt: skip
    anchor = match.output.producer()
    _name_outputs(tape.nodes, f"{anchor.name or match.output.name}_gqa")
    carry_metadata(list(match.nodes), anchor, tape.nodes)
    old = (match.output, match.present_key, match.present_value)
    ir.convenience.replace_nodes_and_values(
        graph, anchor, list(match.nodes), tape.nodes, old, outputs
    )


def _rotated_outside(
    tape: ir.tape.Tape, match: AttentionMatch, shared: _SharedInputs
) -> list[ir.Value]:
    """The query and key, each rotated by a RotaryEmbedding on the exporter's own angles."""
    positions, cos_cache, sin_cache = shared.caches(match.rotation, match.head_size)
    return [
        tape.op(
            "RotaryEmbedding",
            [x, positions, cos_cache, sin_cache],
            domain=MICROSOFT_DOMAIN,
            attributes={"num_heads": heads, "rotary_embedding_dim": match.head_size},
        )
        for x, heads in ((match.query, match.num_heads), (match.key, match.kv_num_heads))
    ]
