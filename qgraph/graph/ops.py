"""Facts about ONNX operators and domains that several layers of qgraph need to agree on.

What belongs here: names fixed by ONNX or onnxruntime (domains, the Q/DQ ops, the integer
ops), the op classes that qgraph's passes, inspection and target rules all treat alike (ops
with a weight), how to read the default domain's opset, and the spelling of an op with its
domain. Each is defined once, here, so that a
pass, the inspection summary and a target's conformance rule cannot disagree about them.

What does not: facts about one target or runtime (``targets/``), how a pass handles an op
(the pass's module), anything that needs a graph. This module imports nothing from qgraph.
"""

from __future__ import annotations

from collections.abc import Mapping

ONNX_DOMAIN = ""
ONNX_DOMAINS = frozenset({ONNX_DOMAIN, "ai.onnx"})
"""The default ONNX domain under both of its names."""

ONNX_ML_DOMAIN = "ai.onnx.ml"
MICROSOFT_DOMAIN = "com.microsoft"
"""onnxruntime's contrib ops (``Gelu``, ``QGemm``, ``MatMulNBits``, 16-bit Q/DQ before opset 21)."""


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

QOPERATOR_PREFIX = "QLinear"
"""ONNX's and onnxruntime's integer ops on quantized tensors: ``QLinearConv``, ``QLinearAdd``..."""

QOPERATOR_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "GatherBlockQuantized",
        "QGemm",
        "QAttention",
        "QOrderedMatMul",
    }
)
"""Integer ops besides the ``QLinear*`` family (ONNX's and onnxruntime's contrib ones)."""

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops with a weight operand, which runtimes fuse with a following bias, activation or Add;
the op types annotate has weight layouts for (``passes/annotate.py``)."""


def is_qoperator(op_type: str) -> bool:
    """Whether ``op_type`` is an integer (QOperator) op: ``QLinear*`` or in ``QOPERATOR_OPS``."""
    return op_type.startswith(QOPERATOR_PREFIX) or op_type in QOPERATOR_OPS


def qualified_op(domain: str, op_type: str) -> str:
    """``op_type`` in the default ONNX domain, else ``domain::op_type``."""
    return op_type if domain in ONNX_DOMAINS else f"{domain}::{op_type}"


def onnx_opset(opset_imports: Mapping[str, int], default: int | None = None) -> int | None:
    """The version of the default ONNX domain in ``opset_imports`` (a model's), under either
    of its names; ``default`` if it imports neither."""
    return opset_imports.get(ONNX_DOMAIN, opset_imports.get("ai.onnx", default))
