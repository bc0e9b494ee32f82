"""Sibling projections packed: MatMuls reading one activation become one MatMul and a Split.

A transformer block reads each normalized activation with several projections (q, k and v;
an MLP's gate and up). With their constant weights side by side along the output axis,

    [x W_1, x W_2, ..., x W_n] = x [W_1 W_2 ... W_n],      W_i: [K, N_i],

one product of width N = sum N_i and a ``Split`` into the N_i give the same tensors: each
output column is the same dot product of x with the same weight column, so the values equal
the separate products to float32 rounding (the kernel may tile K differently). Quantization
treats the columns as before: per output channel, or per block along K within a column, the
packed weight's scales are the W_i's side by side.

Why: at one token a step, a decoder's projections are small matrix-vector products whose
per-call cost is a large share of their time. onnxruntime-genai's model builder packs q, k
and v for this reason. Measured on SmolLM2-135M int4 (``MatMulNBits``, one thread, AVX2):
211 products a step packed into 121, decode 45.6 -> 47.4 tokens/s.

A member the user keeps in float (``--exclude-node``, ``--exclude-op``) is left out, since the
packed product is quantized as one; so are products of a non-constant or non-2-D weight.

Where a packed product's parts are the query, key and value of one ``GroupQueryAttention``
(inputs 0, 1 and 2, in that order, read by nothing else: the kernel rotates them itself), the
kernel takes the packed tensor as its query and slices it itself (onnxruntime's packed QKV:
widths Hq * D, Hkv * D, Hkv * D), and the Split goes: the same values, one copy fewer a layer.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.graph.traversal import carry_metadata
from qgraph.passes.rule_table import NearMiss, label
from qgraph.recipe import QuantOptions

RULE_NAME = "pack-projections"
SUMMARY = "MatMuls reading one activation with constant [K, N_i] weights -> one MatMul + Split"
ATTENTION_RULE = "packed-qkv-attention"
"""The second rewrite: a packed q|k|v read whole by GroupQueryAttention, without its Split."""
QKV_SLOTS = (0, 1, 2)
"""GroupQueryAttention's query, key and value inputs."""
MIN_OPSET = 13
"""Split takes its sizes as an input from opset 13."""


def pack_projections(
    model: ir.Model, options: QuantOptions
) -> tuple[dict[str, int], tuple[NearMiss, ...]]:
    """Pack each group of sibling projections of ``model``, and hand attention its packed
    q|k|v whole; (rewrites per rule, near-misses)."""
    if model.opset_imports.get("", 0) < MIN_OPSET:
        return {RULE_NAME: 0}, ()
    graph, splits, misses = model.graph, [], []
    for source, members in _siblings(graph).items():
        kept = [node for node in members if options.excluded(node) is None]
        if len(kept) < len(members):
            misses.append(
                NearMiss(RULE_NAME, label(members[0]), f"a reader of '{source.name}' stays float")
            )
        if len(kept) >= 2:
            splits.append(_pack(graph, source, kept))
    fed = sum(_feed_attention(graph, split) for split in splits)
    return {RULE_NAME: len(splits), ATTENTION_RULE: fed}, tuple(misses)


def _siblings(graph: ir.Graph) -> dict[ir.Value, list[ir.Node]]:
    """Activation -> its readers that are MatMuls by a constant 2-D weight of one K and dtype,
    where there are two or more."""
    groups: dict[tuple[ir.Value, int, ir.DataType], list[ir.Node]] = collections.defaultdict(list)
    for node in graph:
        weight = _weight(node)
        if weight is not None:
            groups[(node.inputs[0], weight.shape[0], weight.dtype)].append(node)
    return {key[0]: nodes for key, nodes in groups.items() if len(nodes) >= 2}


def _weight(node: ir.Node) -> ir.TensorProtocol | None:
    """The constant 2-D weight of a default-domain MatMul, or None."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
        return None
    x, w = node.inputs
    tensor = w.const_value if w is not None else None
    if x is None or tensor is None or len(tensor.shape) != 2:
        return None
    return tensor


def _pack(graph: ir.Graph, source: ir.Value, members: list[ir.Node]) -> ir.Node:
    """Replace ``members`` by one MatMul on their weights side by side and a Split; the Split."""
    first = members[0]
    weights = [node.inputs[1].const_value.numpy() for node in members]
    name = f"{first.inputs[1].name}.packed"
    packed = ir.Value(name=name, const_value=ir.tensor(np.concatenate(weights, axis=1), name=name))
    sizes = ir.Value(
        name=f"{name}_sizes",
        const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)),
    )
    graph.register_initializer(packed)
    graph.register_initializer(sizes)
    matmul = ir.node("MatMul", [source, packed], name=f"{first.name}/packed")
    split = ir.node(
        "Split",
        [matmul.outputs[0], sizes],
        attributes={"axis": -1},
        num_outputs=len(members),
        name=f"{first.name}/packed_split",
    )
    matmul.outputs[0].name = f"{first.outputs[0].name}.packed"
    carry_metadata(members, first, [matmul, split])
    graph.insert_before(first, [matmul, split])
    for old, new in zip(members, split.outputs, strict=True):
        name, value = old.outputs[0].name, old.outputs[0]
        ir.convenience.replace_all_uses_with(value, new, replace_graph_outputs=True)
        new.type, new.shape = value.type, value.shape
        graph.remove(old, safe=True)
        new.name = name
    return split


def _feed_attention(graph: ir.Graph, split: ir.Node) -> bool:
    """Give the GroupQueryAttention that reads ``split``'s three parts as its query, key and
    value the packed tensor instead, and drop the Split; whether it did."""
    attention = _attention_reading(split)
    if attention is None:
        return False
    query_width, key_width, value_width = split.inputs[1].const_value.numpy().tolist()
    heads = attention.attributes.get_int("num_heads", 0)
    kv_heads = attention.attributes.get_int("kv_num_heads", 0)
    head_size = query_width // heads if heads else 0
    if head_size * heads != query_width or not key_width == value_width == kv_heads * head_size:
        return False
    packed = split.inputs[0]
    for node, slot in list(split.outputs[0].uses()):
        node.replace_input_with(slot, packed)
    attention.replace_input_with(1, None)
    attention.replace_input_with(2, None)
    graph.remove(split, safe=True)
    return True


def _attention_reading(split: ir.Node) -> ir.Node | None:
    """The GroupQueryAttention reading ``split``'s outputs as its inputs 0, 1, 2, where
    nothing else reads them but Shapes of the query's batch and sequence axes (the packed
    tensor has the same), or None."""
    parts = split.outputs
    if len(parts) != len(QKV_SLOTS) or any(v.is_graph_output() for v in parts):
        return None
    query = parts[0]
    uses = [[u for u in v.uses() if v is not query or not _leading_shape(u[0])] for v in parts]
    if any(len(u) != 1 for u in uses):
        return None
    attention = uses[0][0][0]
    if (attention.domain, attention.op_type) != (MICROSOFT_DOMAIN, "GroupQueryAttention"):
        return None
    if [tuple(u[0]) for u in uses] != [(attention, slot) for slot in QKV_SLOTS]:
        return None
    return attention


def _leading_shape(node: ir.Node) -> bool:
    """Whether ``node`` is a Shape of axes 0 and 1 alone, the batch and sequence."""
    if node.op_type != "Shape" or node.domain != "":
        return False
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return start >= 0 and end is not None and start < end <= 2
