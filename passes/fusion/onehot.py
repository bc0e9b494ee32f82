"""A one-hot vector times a weight matrix is a row lookup: ``MatMul`` -> ``Gather``.

Exporters (jax2tf, some Keras graphs) write an embedding as
``MatMul(Cast(Equal(ids, classes)), W)`` with ``ids`` of shape [..., 1], ``classes`` the
constant ``0, 1, ..., K-1`` along the last axis and ``W`` a constant [K, N]. Row r of the
one-hot matrix has a single 1 at column ``ids[r]`` (or none when ``ids[r]`` is outside
[0, K)), so

    ``onehot(ids) W = W[ids]``, and ``= 0`` for an id outside [0, K).

That is ``Gather(W', where(0 <= ids < K, ids, K))`` with ``W' = [W; 0]``, a zero row
appended for out-of-range ids (Gather alone would wrap negative ids or fail). Each product is
``1 * w`` or ``0 * w``, so the result is exact when W is finite. The lookup reads N numbers per
row instead of multiplying K by N, and a table lookup is never quantized: the error a one-hot
product's 8-bit weights would add is gone too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    model_opset,
    not_a_candidate,
)

INDEX_TYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})
"""The index types ``Gather`` takes."""
SQUEEZE_AXES_INPUT_OPSET = 13


def _class_count(classes: np.ndarray | None, ids_rank: int) -> int | None:
    """K when ``classes`` is ``0..K-1`` along its last axis with 1s before it, else None."""
    if classes is None or classes.ndim == 0 or classes.ndim > ids_rank:
        return None
    if any(dim != 1 for dim in classes.shape[:-1]):
        return None
    count = classes.shape[-1]
    return count if np.array_equal(classes.reshape(-1), np.arange(count)) else None


class OneHotMatMulToGather(TargetRule):
    """``MatMul(Cast(Equal(ids, 0..K-1)), W)`` -> ``Gather([W; 0], ids or K)``."""

    root_ops = frozenset({"MatMul"})

    def pattern(self, op, ids, classes, weight):
        return op.MatMul(op.Cast(op.Equal(ids, classes)), weight)

    def check(self, context, ids, classes, weight, **_) -> MatchResult:
        if ids.shape is None or ids.shape.rank() == 0:
            return not_a_candidate()
        count = _class_count(constant(classes), ids.shape.rank())
        if count is None:
            return not_a_candidate()
        if ids.dtype not in INDEX_TYPES:
            return fail(f"ids '{ids.name}' are {ids.dtype}; Gather takes int32 or int64", ids)
        table = constant(weight)
        if table is None or table.ndim != 2 or weight.dtype not in FLOAT_TYPES:
            return fail("the one-hot product's weight is not a constant float matrix", weight)
        if table.shape[0] != count:
            return fail(f"the weight has {table.shape[0]} rows for {count} classes", weight)
        if ids.shape[-1] != 1:
            return fail(f"ids '{ids.name}' of shape {ids.shape} do not end in a 1", ids)
        if not np.isfinite(table).all():
            return fail(f"weight '{weight.name}' is not finite, so 0 * w is not 0", weight)
        if model_opset(context) < SQUEEZE_AXES_INPUT_OPSET:
            return fail(f"opset below {SQUEEZE_AXES_INPUT_OPSET}", ids)
        return MatchResult()

    def rewrite(self, op, ids, classes, weight, **_):
        table = constant(weight)
        count = table.shape[0]
        padded = np.concatenate([table, np.zeros((1, table.shape[1]), table.dtype)])
        flat_ids = op.Squeeze(ids, op.Constant(value_ints=[-1]))
        lowest, beyond = (
            op.Constant(value=ir.tensor(np.array(v, ids.dtype.numpy()))) for v in (0, count)
        )
        in_range = op.And(op.GreaterOrEqual(flat_ids, lowest), op.Less(flat_ids, beyond))
        rows = op.Where(in_range, flat_ids, beyond)
        return op.Gather(fresh_weight(op, weight, padded, "lookup"), rows, axis=0)
