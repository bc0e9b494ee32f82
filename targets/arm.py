"""ARM64 (aarch64) CPUs with NEON, run by onnxruntime's CPU execution provider.

s8 activations x s8 weights feed the SDOT / SMMLA kernels, and onnxruntime fuses int8 Q/DQ
groups into them on ARM. As on x86, a signed activation Q/DQ is fused only when it has one
consumer, so each consumer gets its own pair.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.targets.runtime import cpu_target

ARM64 = cpu_target(
    name="arm64",
    summary="ARM64 NEON (dotprod / i8mm): s8 activations x s8 weights, Q/DQ",
    arch="aarch64",
    activation_dtype=ir.DataType.INT8,
    weight_dtype=ir.DataType.INT8,
    per_consumer=True,
    dynamic_table_projection=False,
    # not measured on ARM hardware: SDOT does 4x the MACs of an fp32 FMLA per instruction,
    # halved for the requantize and layout work
    nominal_int8_speedup=2.0,
    # Arm cores compute with subnormal numbers in hardware, without x86's microcode assists
    # (not measured on ARM hardware)
    slow_subnormals=False,
)
