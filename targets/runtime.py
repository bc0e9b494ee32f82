"""Facts about onnxruntime (1.31) shared by every target it runs."""

from __future__ import annotations

MAX_ORT_IR_VERSION = 13
"""onnxruntime refuses models whose IR version is above this (onnx 1.23 writes 14)."""

MAX_ORT_OPSET = 26
"""Highest ai.onnx opset onnxruntime officially runs; it refuses models stamped above it."""

CPU_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
"""Operator domains onnxruntime's CPU execution provider runs."""

CPU_QUANTIZABLE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
"""Ops with integer CPU kernels that beat fp32; quantizing more mostly costs accuracy."""

PER_CHANNEL_MIN_OPSET = 13
"""DequantizeLinear gained ``axis`` (per-channel scales) in opset 13."""
