"""4-bit weights in blocks lowered to onnxruntime's ``MatMulNBits``.

``MatMul(a, DQ(w_q, s, z, axis=0, block_size=B))`` with float ``a`` and ``w_q`` [K, N] int4 or
uint4 dequantizes ``w[k, n] = (w_q[k, n] - z[k // B, n]) s[k // B, n]``. ``MatMulNBits`` reads the
same numbers stored per output column: ``B`` [N, ceil(K / B), B / 2] bytes of unsigned nibbles,
two to a byte, low nibble first; ``scales`` [N, ceil(K / B)]; zero points packed the same way,
8 when absent. Signed int4 becomes unsigned by adding 8 to values and zero points alike, which
leaves ``w_q - z`` unchanged. Rows past K (when B does not divide K) hold the zero point, so they
dequantize to 0.

``accuracy_level`` is 4, as onnxruntime's own fusion of the Q/DQ form writes it: the kernel
quantizes ``a`` to int8 per block as it runs, so the lowered model computes what the Q/DQ model
computes in onnxruntime. With 1 (float32 compute) SmolLM2's int4 decoder decoded 16.4 tokens/s
against 43.1 (one thread, AVX2): slower than the Q/DQ form it came from.

An 8-bit weight-only MatMul stays ``MatMul(a, DQ(w))``: onnxruntime fuses that into an 8-bit
``MatMulNBits`` itself. But it first fuses a MatMul, the ``Add`` of a constant bias and a Relu
after it into a float ``Gemm`` / ``FusedGemm``, which then dequantizes its weight on every run.
So that ``Add`` is written as ``Sum`` (``BiasAsSum``): the same one addition per element, which
onnxruntime does not fuse. Measured on the README's MLP, weight-only 8-bit, one thread at batch
1: 14.4 ms with the Adds (three FusedGemm dequantizing), 0.34 ms with Sums (four MatMulNBits),
against 1.02 ms in float.
"""

from __future__ import annotations

import numpy as np

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    not_a_candidate,
)
from qgraph.passes.lowering.groups import (
    EIGHT_BIT,
    FOUR_BIT,
    dequantized,
    new_initializer,
)

BITS = 4
UNSIGNED_ZERO_POINT = 1 << (BITS - 1)
MIN_BLOCK = 16
INT8_COMPUTE = 4


class MatMulToMatMulNBits(TargetRule):
    """``MatMul(a, DQ(w 4-bit, blocks along K))`` -> ``com.microsoft.MatMulNBits``."""

    root_ops = frozenset({"MatMul"})

    def pattern(self, op, a, w):
        return op.MatMul(a, w, _outputs=["out"])

    def check(self, context, a, w, out, **_) -> MatchResult:
        weight = dequantized(w)
        if weight is None or weight.dtype not in FOUR_BIT:
            return not_a_candidate()
        if a.dtype not in FLOAT_TYPES or dequantized(a) is not None:
            return fail("its activation is quantized too; MatMulNBits reads a float one", a)
        self._values = constant(weight.values)
        self._scale = constant(weight.scale)
        self._zero_point = weight.zero_point_array()
        block = weight.block_size
        if self._values is None or self._scale is None or self._zero_point is None:
            return fail("its weight, scale or zero point is not a constant", w)
        if self._values.ndim != 2 or weight.axis % 2 != 0:
            return fail("its weight is not [K, N] with blocks along K (axis 0)", w)
        if block < MIN_BLOCK or block & (block - 1):
            return fail(f"block size {block} is not a power of 2 of at least {MIN_BLOCK}", w)
        self._block, self._signed = block, weight.dtype.is_signed()
        self._matmul = out.producer()
        return MatchResult()

    def rewrite(self, op, a, w, out, **_):
        k, n = self._values.shape
        offset = UNSIGNED_ZERO_POINT if self._signed else 0
        blocks = -(-k // self._block)
        zero_point = np.broadcast_to(self._zero_point.astype(np.int16), (blocks, n)) + offset
        values = np.repeat(zero_point, self._block, axis=0)  # padding rows dequantize to 0
        values[:k] = self._values.astype(np.int16) + offset
        packed = _pack_nibbles(values.T.reshape(n, blocks, self._block))
        scales = np.ascontiguousarray(np.broadcast_to(self._scale, (blocks, n)).T, np.float32)
        matmul = self._matmul
        inputs = [
            a,
            new_initializer(op, matmul, "weight", packed),
            new_initializer(op, matmul, "scales", scales),
        ]
        if np.any(zero_point != UNSIGNED_ZERO_POINT):
            packed_zero_point = _pack_nibbles(zero_point.T)
            inputs.append(new_initializer(op, matmul, "zero_points", packed_zero_point))
        return op.MatMulNBits(
            *inputs,
            K=k,
            N=n,
            bits=BITS,
            block_size=self._block,
            accuracy_level=INT8_COMPUTE,
            _domain=MICROSOFT_DOMAIN,
        )


class BiasAsSum(TargetRule):
    """``Add(MatMul(a, DQ(w 8-bit)), c)`` with a float ``a`` and a constant ``c`` -> ``Sum``."""

    root_ops = frozenset({"Add"})

    def pattern(self, op, a, w, c):
        return op.Add(op.MatMul(a, w), c)

    def check(self, context, a, w, c, **_) -> MatchResult:
        weight = dequantized(w)
        if weight is None or weight.dtype not in EIGHT_BIT or dequantized(a) is not None:
            return not_a_candidate()
        if constant(c) is None:
            return fail("what it adds is not a constant bias", c)
        return MatchResult()

    def rewrite(self, op, a, w, c, **_):
        return op.Sum(op.MatMul(a, w), c)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit ``values`` two to a byte along the last axis, low nibble first."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    low, high = values[..., 0::2], values[..., 1::2]
    return (low | (high << 4)).astype(np.uint8)
