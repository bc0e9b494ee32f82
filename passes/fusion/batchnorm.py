"""BatchNormalization folded into the weighted op before it.

In inference, ``BN(y) = s * y + t`` per channel c, with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``. When ``y = W * x + b`` is linear in its weights along the channel:

- ``Conv``:          ``W'[c, ...] = s[c] W[c, ...]``, ``b' = s b + t`` (output channels on axis 0)
- ``ConvTranspose``: weights are [C_in, C_out / group, ...]; output channel ``c = g * C_out/group
  + j`` scales ``W[g-th block of C_in, j, ...]``, ``b' = s b + t``
- ``Gemm``:          ``Y = alpha A B + beta C``: B's output columns scale by s (rows if
  ``transB``), ``C' = s (beta C) + t`` and ``beta`` becomes 1
- ``MatMul`` [M, K] x [K, N]: BatchNormalization's channel axis 1 is then N, so
  ``W'[:, c] = s[c] W[:, c]`` and ``+ t`` follows as an ``Add`` (only for rank-2 outputs; on
  [B, S, N] BatchNormalization's axis 1 is S, which no weight carries).

The product ``s W`` is computed in float64 and rounded once to the weights' dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS
from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    weight_problem,
)

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_EPSILON = 1e-5


class FoldBatchNorm(TargetRule):
    """``BatchNormalization(Conv | ConvTranspose | Gemm | MatMul (x, W, b))`` -> one op."""

    root_ops = frozenset({"BatchNormalization"})

    def pattern(self, op, y, gamma, beta, mean, var):
        return op.BatchNormalization(y, gamma, beta, mean, var, _allow_other_attributes=True)

    def check(self, context, y, gamma, beta, mean, var, **_) -> MatchResult:
        producer = y.producer()
        if (
            producer is None
            or producer.op_type not in FOLDABLE
            or producer.domain not in ONNX_DOMAINS
        ):
            found = "a graph input" if producer is None else producer.op_type
            return fail(f"its input comes from {found}, not {'/'.join(FOLDABLE)}", y)
        batch_norm = context.root
        self._epsilon = batch_norm.attributes.get_float("epsilon", DEFAULT_EPSILON)
        if batch_norm.attributes.get_int("training_mode", 0):
            return fail("BatchNormalization is in training mode", batch_norm)
        if any(constant(v) is None for v in (gamma, beta, mean, var)):
            return fail("BatchNormalization's statistics are not constants", batch_norm)
        if len(y.uses()) > 1:
            return fail(f"{producer.op_type} output '{y.name}' also feeds other nodes", y)
        if y.dtype not in FLOAT_TYPES:
            return fail(f"{y.dtype} is not a float type", y)
        return _producer_problem(producer, y)

    def rewrite(self, op, y, gamma, beta, mean, var, **_):
        producer = y.producer()
        scale = constant(gamma).astype(np.float64) / np.sqrt(
            constant(var).astype(np.float64) + self._epsilon
        )
        shift = constant(beta) - constant(mean) * scale
        return FOLDERS[producer.op_type](op, producer, scale, shift)


def _producer_problem(producer: ir.Node, y: ir.Value) -> MatchResult:
    problem = weight_problem(producer.inputs[1] if len(producer.inputs) > 1 else None, producer)
    if problem is not None:
        return fail(f"{producer.op_type}: {problem}", producer)
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    if bias is not None and constant(bias) is None:
        return fail(f"{producer.op_type} bias '{bias.name}' is not a constant", producer)
    if producer.op_type == "MatMul" and (y.shape is None or len(y.shape) != 2):
        return fail(
            "MatMul output is not rank 2, so BatchNormalization's channel axis is not the "
            "weights' output columns",
            producer,
        )
    return MatchResult()


def _bias(producer: ir.Node, channels: int) -> np.ndarray:
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    return np.zeros(channels) if bias is None else constant(bias).astype(np.float64)


def _fold_conv(op, conv: ir.Node, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    weight = conv.inputs[1]
    w = constant(weight).astype(np.float64)
    folded = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    bias = _bias(conv, len(scale)) * scale + shift
    return op.Conv(
        conv.inputs[0],
        fresh_weight(op, weight, folded, "bn_folded"),
        fresh_weight(op, weight, bias, "bn_folded_bias"),
        **conv.attributes,
    )


def _fold_conv_transpose(op, conv: ir.Node, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    weight = conv.inputs[1]
    w = constant(weight).astype(np.float64)
    group = conv.attributes.get_int("group", 1)
    blocks = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
    per_block = scale.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))
    folded = (blocks * per_block).reshape(w.shape)
    bias = _bias(conv, len(scale)) * scale + shift
    return op.ConvTranspose(
        conv.inputs[0],
        fresh_weight(op, weight, folded, "bn_folded"),
        fresh_weight(op, weight, bias, "bn_folded_bias"),
        **conv.attributes,
    )


def _fold_gemm(op, gemm: ir.Node, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    weight = gemm.inputs[1]
    w = constant(weight).astype(np.float64)
    trans_b = gemm.attributes.get_int("transB", 0)
    folded = w * (scale[:, None] if trans_b else scale[None, :])
    beta = gemm.attributes.get_float("beta", 1.0)
    bias = beta * _bias(gemm, len(scale)) * scale + shift
    attributes = {k: v for k, v in gemm.attributes.items() if k != "beta"}
    return op.Gemm(
        gemm.inputs[0],
        fresh_weight(op, weight, folded, "bn_folded"),
        fresh_weight(op, weight, bias, "bn_folded_bias"),
        **attributes,
    )


def _fold_matmul(op, matmul: ir.Node, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    weight = matmul.inputs[1]
    folded = constant(weight).astype(np.float64) * scale[None, :]
    product = op.MatMul(matmul.inputs[0], fresh_weight(op, weight, folded, "bn_folded"))
    return op.Add(product, fresh_weight(op, weight, shift, "bn_folded_bias"))


FOLDERS = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
}
