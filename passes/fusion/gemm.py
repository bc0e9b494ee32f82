"""``MatMul + Add(bias)`` and ``Gemm``, turned into whichever the target prefers.

``Gemm(A, B, C) = alpha op(A) op(B) + beta C`` for 2-D A and B, where C broadcasts to [M, N]
one way only (each of C's trailing dimensions is 1 or equal to the result's). So

- ``Add(MatMul(A, B), C)`` -> ``Gemm(A, B, C)`` when A and B are 2-D (rank 3 and up is no
  candidate) and C broadcasts to [M, N] one way (an Add that widens the result, e.g. C of
  [2, M, N], is not a Gemm) and C is a constant (a computed C would keep the Gemm from its
  quantized kernel, which adds only a constant int32 bias);
- ``Gemm(A, B, C)`` with ``alpha = beta = 1``, ``transA = 0`` -> ``Add(MatMul(A, op(B)), C)``,
  ``op(B) = B^T`` stored transposed when B is a constant only this Gemm reads, else a Transpose.

Targets with ``matmul_add_as_gemm`` get the first (one op, its bias quantized to int32 with
``scale_x * scale_w``); the others the second.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    not_a_candidate,
    weight_problem,
)


def _broadcast_problem(bias: ir.Value, rows: int | ir.SymbolicDim, columns: int) -> str | None:
    """Why ``bias`` does not broadcast one way onto [rows, columns] (None if it does)."""
    if bias.shape is None:
        return f"the shape of bias '{bias.name}' is unknown"
    dims = list(bias.shape)
    if len(dims) > 2:
        return f"bias '{bias.name}' has rank {len(dims)}, so the Add widens the product"
    for dim, result in zip(reversed(dims), (columns, rows), strict=False):
        if dim != 1 and dim != result:
            return f"bias '{bias.name}' of shape {bias.shape} does not broadcast to the product"
    return None


class MatMulAddToGemm(TargetRule):
    """``Add(MatMul(A, B), C)`` -> ``Gemm(A, B, C)``."""

    root_ops = frozenset({"Add"})

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b), c)

    def check(self, context, a, b, c, **_) -> MatchResult:
        if any(value.shape is None or len(value.shape) != 2 for value in (a, b)):
            return not_a_candidate()
        if a.dtype not in FLOAT_TYPES:
            return fail(f"{a.dtype} is not a float type", a)
        if constant(c) is None:
            return fail(
                f"'{c.name}' is computed, not a constant bias (a quantized Gemm adds only a "
                "constant int32 bias in its kernel)",
                c,
            )
        problem = _broadcast_problem(c, a.shape[0], b.shape[1])
        return MatchResult() if problem is None else fail(problem, c)

    def rewrite(self, op, a, b, c, **_):
        return op.Gemm(a, b, c)


class GemmToMatMulAdd(TargetRule):
    """``Gemm(A, B[, C])`` -> ``Add(MatMul(A, op(B)), C)``."""

    root_ops = frozenset({"Gemm"})

    def pattern(self, op, a, b):
        return op.Gemm(a, b, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, a, b, out, **_) -> MatchResult:
        gemm = out.producer()
        attributes = gemm.attributes
        if attributes.get_int("transA", 0):
            return fail("transA = 1 would need a Transpose of the activations", gemm)
        if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
            return fail("alpha or beta is not 1", gemm)
        return MatchResult()

    def rewrite(self, op, a, b, out, **_):
        gemm = out.producer()
        if gemm.attributes.get_int("transB", 0):
            b = self._transposed(op, b, gemm)
        product = op.MatMul(a, b)
        bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        return product if bias is None else op.Add(product, bias)

    @staticmethod
    def _transposed(op, b: ir.Value, gemm: ir.Node) -> ir.Value:
        if weight_problem(b, gemm) is None:
            return fresh_weight(op, b, constant(b).T, "transposed")
        return op.Transpose(b, perm=[1, 0])
