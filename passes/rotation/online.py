"""Online rotations: ``y = x Q`` over the last axis, as graph ops kept in float.

Three forms, for ``Q = (A (x) B) / sqrt(n)`` with ``A = H_m``, ``B = H_{2^k}`` (Sylvester),
``n = m 2^k``. Row-major, ``x`` of length ``n`` is a matrix ``X`` of shape ``[m, 2^k]`` and
``x (A (x) B) = vec(A^T X B)``:

- ``dense``: ``MatMul(x, Q)``; ``n^2`` multiply-adds a row, one node. The only form for a
  random orthogonal ``Q``.
- ``factored``: ``Reshape`` to ``[..., m, 2^k]``, ``MatMul(X, B / sqrt(n))``, ``MatMul(A^T,
  .)`` (left out for ``m = 1``), ``Reshape`` back: ``n (m + 2^k)`` multiply-adds a row.
- ``butterfly``: ``A^T`` and ``1 / sqrt(n)`` as a ``MatMul`` (a ``Mul`` for ``m = 1``), then
  ``. B`` as ``k`` stages of ``[a, b] -> [a + b, a - b]`` (``Reshape``, ``Split``, ``Add``,
  ``Sub``, ``Concat``): ``n (m + k)`` operations a row.

``choose_form`` takes the cheapest by ``FORM_COSTS``: per-row arithmetic plus a fixed cost per
node, in units of one float multiply-add, for a typical batch of ``TYPICAL_ROWS`` rows.
The constants come from ``benchmarks/online_rotation.py``, which times each form in
onnxruntime (one thread) and prints the measured and modelled ratios side by side: the
factored form wins where ``m > 1`` (SmolLM2's 1536 and 576), the butterfly for a power of two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qgraph.graph.traversal import KEEP_FLOAT_KEY
from qgraph.passes.rotation.hadamard import HadamardOrder, Rotation, base_hadamard, sylvester

TYPICAL_ROWS = 512
"""Rows (tokens) a compiled transformer usually sees per run: the per-node cost's divisor."""
NODE_COST = 200_000.0
"""A node's fixed cost (dispatch, allocation: ~10 us), in multiply-adds of a float MatMul
(~0.05 ns each, one thread)."""
ADD_COST = 30.0
"""A butterfly stage's cost per element, in MatMul multiply-adds: ~1.6 ns against ~0.05 ns,
as its Split/Add/Sub/Concat stream the rows through memory in small strided pieces
(``benchmarks/online_rotation.md``)."""
KEEP_FLOAT_REASON = "an online rotation (rotation pass), kept in float"


@dataclasses.dataclass(frozen=True)
class FormCost:
    """A form's arithmetic per row and its node count, for order ``m * 2^k``."""

    work: Callable[[HadamardOrder], float]
    nodes: Callable[[HadamardOrder], int]

    def per_row(self, order: HadamardOrder) -> float:
        return self.work(order) + self.nodes(order) * NODE_COST / TYPICAL_ROWS


FORM_COSTS = {
    "dense": FormCost(lambda o: o.n**2, lambda o: 1),
    "factored": FormCost(lambda o: o.n * (o.m + (1 << o.k)), lambda o: 4 if o.m > 1 else 3),
    "butterfly": FormCost(lambda o: o.n * (o.k * ADD_COST + o.m), lambda o: 5 * o.k + 3),
}


def choose_form(rotation: Rotation) -> str:
    """The cheapest form for ``rotation`` (``dense`` unless it is a plain Hadamard matrix)."""
    if rotation.order is None or rotation.randomized:
        return "dense"
    return min(FORM_COSTS, key=lambda form: FORM_COSTS[form].per_row(rotation.order))


class _Emitter:
    """Appends float nodes after ``anchor``, each named under ``prefix`` and kept in float."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node | None, prefix: str) -> None:
        self.graph, self.anchor, self.prefix = graph, anchor, prefix
        self.count = 0

    def constant(self, label: str, array: np.ndarray) -> ir.Value:
        name = f"{self.prefix}.{label}"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], outputs: int = 1, **attributes) -> list:
        self.count += 1
        node = ir.node(
            op_type,
            inputs,
            attributes=attributes,
            num_outputs=outputs,
            name=f"{self.prefix}/{op_type}_{self.count}",
        )
        node.metadata_props[KEEP_FLOAT_KEY] = KEEP_FLOAT_REASON
        for i, output in enumerate(node.outputs):
            output.name = f"{self.prefix}/{op_type}_{self.count}_output_{i}"
        if self.anchor is None:
            self.graph.insert_before(self.graph.node(0), node)
        else:
            self.graph.insert_after(self.anchor, node)
        self.anchor = node
        return list(node.outputs)


def insert_online(
    value: ir.Value, readers: list[ir.Node], rotation: Rotation, prefix: str, form: str
) -> int:
    """Make ``readers`` read ``value @ rotation.matrix`` in ``form``; the nodes inserted."""
    if form == "dense":
        insert_matmul(value, readers, rotation.matrix, prefix)
        return 1
    emit = _Emitter(readers[0].graph, value.producer(), prefix)
    result = _structured(emit, value, len(value.shape), rotation.order, form == "butterfly")
    _rewire(value, readers, result)
    return emit.count


def insert_matmul(
    value: ir.Value,
    readers: list[ir.Node],
    matrix: np.ndarray,
    prefix: str,
    graph: ir.Graph | None = None,
) -> ir.Value:
    """Make ``readers`` read ``MatMul(value, matrix)`` (float32, kept in float); its output.
    ``graph`` is needed only where there are no readers (a new graph output)."""
    emit = _Emitter(graph or readers[0].graph, value.producer(), prefix)
    (result,) = emit.op("MatMul", [value, emit.constant("matrix", matrix.astype(np.float32))])
    _rewire(value, readers, result)
    return result


def _rewire(value: ir.Value, readers: list[ir.Node], result: ir.Value) -> None:
    result.shape, result.type = value.shape, value.type
    for reader in readers:
        for index, operand in enumerate(reader.inputs):
            if operand is value:
                reader.replace_input_with(index, result)


def _structured(
    emit: _Emitter, value: ir.Value, rank: int, order: HadamardOrder, butterfly: bool
) -> ir.Value:
    """``value (H_m (x) H_{2^k}) / sqrt(n)`` through a ``[..., m, 2^k]`` view of the last axis:
    ``A^T X B`` with ``A^T`` (and the scale) first, then ``B`` as a MatMul or butterfly."""
    keep = [0] * (rank - 1)
    blocks_shape = np.array([*keep, order.m, 1 << order.k], dtype=np.int64)
    (x,) = emit.op("Reshape", [value, emit.constant("blocks_shape", blocks_shape)])
    scale = 1.0 / np.sqrt(order.n)
    fast = sylvester(order.k).astype(np.float64)
    if not butterfly:
        (x,) = emit.op("MatMul", [x, emit.constant("fast", (fast * scale).astype(np.float32))])
        scale = 1.0
    if order.m > 1:
        outer = (base_hadamard(order.m).T * scale).astype(np.float32)
        (x,) = emit.op("MatMul", [emit.constant("outer", outer), x])
    elif scale != 1.0:
        (x,) = emit.op("Mul", [x, emit.constant("scale", np.array(scale, dtype=np.float32))])
    if butterfly:
        x = _butterfly(emit, x, rank + 1, order)
    row_shape = np.array([*keep, order.n], dtype=np.int64)
    (x,) = emit.op("Reshape", [x, emit.constant("row_shape", row_shape)])
    return x


def _butterfly(emit: _Emitter, x: ir.Value, rank: int, order: HadamardOrder) -> ir.Value:
    """``X H_{2^k}`` on the last axis of ``x`` (rank ``rank``) in ``k`` add/sub stages; stage
    ``h`` views each row as ``[2^k / 2h, 2, h]`` pairs (row-major, so no copy between stages)
    and writes ``[a + b, a - b]``. The result keeps the last stage's view."""
    keep = [0] * (rank - 1)
    blocks = 1 << order.k
    halves = emit.constant("halves", np.array([1, 1], dtype=np.int64))
    half = 1
    while half < blocks:
        pairs = np.array([*keep, blocks // (2 * half), 2, half], dtype=np.int64)
        (paired,) = emit.op("Reshape", [x, emit.constant(f"stage{half}_shape", pairs)])
        first, second = emit.op("Split", [paired, halves], outputs=2, axis=-2)
        (total,) = emit.op("Add", [first, second])
        (difference,) = emit.op("Sub", [first, second])
        (x,) = emit.op("Concat", [total, difference], axis=-2)
        half *= 2
    return x
