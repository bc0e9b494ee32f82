"""ARM64 (aarch64) CPUs with NEON, run by onnxruntime's CPU execution provider.

s8 activations x s8 weights feed the SDOT / SMMLA kernels, and onnxruntime fuses int8 Q/DQ
groups into them on ARM. As on x86, a signed activation Q/DQ is fused only when it has one
consumer, so each consumer gets its own pair.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.targets.conformance import LOADABLE_RULES
from qgraph.targets.runtime import (
    CPU_DEFAULT_DOMAIN_EXTENSIONS,
    CPU_DOMAINS,
    CPU_DYNAMIC_QUANTIZABLE_OPS,
    CPU_LOWERING_RULES,
    CPU_OUTPUT_QUANTIZED_OPS,
    CPU_QUANTIZABLE_OPS,
    MAX_ORT_IR_VERSION,
    MAX_ORT_OPSET,
    PER_CHANNEL_MIN_OPSET,
)
from qgraph.targets.spec import QuantFormat, TargetSpec

ARM64 = TargetSpec(
    name="arm64",
    summary="ARM64 NEON (dotprod / i8mm): s8 activations x s8 weights, Q/DQ",
    arch="aarch64",
    execution_provider="CPUExecutionProvider",
    format=QuantFormat.QDQ,
    activation_dtype=ir.DataType.INT8,
    weight_dtype=ir.DataType.INT8,
    activation_symmetric=False,
    weight_symmetric=True,
    weight_bits=8,
    per_channel_weights=True,
    qdq_per_consumer=True,
    int16_activations=True,
    int16_kernels=False,
    quantizable_ops=CPU_QUANTIZABLE_OPS,
    lowering_rules=CPU_LOWERING_RULES,
    min_opset=PER_CHANNEL_MIN_OPSET,
    max_ir_version=MAX_ORT_IR_VERSION,
    max_opset=MAX_ORT_OPSET,
    default_domain_extensions=CPU_DEFAULT_DOMAIN_EXTENSIONS,
    matmul_add_as_gemm=True,
    allowed_domains=CPU_DOMAINS,
    conformance_rules=LOADABLE_RULES,
    int32_bias=True,
    quantize_residual_inputs=False,
    activation_products=True,
    quantized_embeddings=True,
    output_quantized_ops=CPU_OUTPUT_QUANTIZED_OPS,
    dynamic_quantizable_ops=CPU_DYNAMIC_QUANTIZABLE_OPS,
    dynamic_format=QuantFormat.QOPERATOR,
    # not measured on ARM hardware: SDOT does 4x the MACs of an fp32 FMLA per instruction,
    # halved for the requantize and layout work
    nominal_int8_speedup=2.0,
    runtime_checked=True,
)
