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
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from qgraph.passes.rule_table import NearMiss, label
from qgraph.recipe import QuantOptions
from qgraph.traversal import carry_metadata

RULE_NAME = "pack-projections"
SUMMARY = "MatMuls reading one activation with constant [K, N_i] weights -> one MatMul + Split"
MIN_OPSET = 13
"""Split takes its sizes as an input from opset 13."""


def pack_projections(model: ir.Model, options: QuantOptions) -> tuple[int, tuple[NearMiss, ...]]:
    """Pack each group of sibling projections of ``model``; (packed groups, near-misses)."""
    if model.opset_imports.get("", 0) < MIN_OPSET:
        return 0, ()
    graph, count, misses = model.graph, 0, []
    for source, members in _siblings(graph).items():
        kept = [node for node in members if options.excluded(node) is None]
        if len(kept) < len(members):
            misses.append(
                NearMiss(RULE_NAME, label(members[0]), f"a reader of '{source.name}' stays float")
            )
        if len(kept) >= 2:
            _pack(graph, source, kept)
            count += 1
    return count, tuple(misses)


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


def _pack(graph: ir.Graph, source: ir.Value, members: list[ir.Node]) -> None:
    """Replace ``members`` by one MatMul on their weights side by side and a Split."""
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
