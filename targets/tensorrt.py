"""NVIDIA TensorRT through onnxruntime's TensorRT execution provider: Q/DQ only.

TensorRT reads explicit Q/DQ and picks its own int8 kernels. Its ONNX parser takes int8
symmetric quantization (zero point 0), per-channel weights and per-tensor activations, and
no QOperator ops (QLinear*, ConvInteger, MatMulInteger, DynamicQuantizeLinear) or
com.microsoft contrib ops. Its DequantizeLinear takes no int32 input, so biases stay float.
It fuses a weighted op with the Add of a skip connection when the skip input is quantized
and the op's output is not (``tensorrt_rules.py`` lists every rule and its source). Its
parser turns ``Gemm`` into a matrix multiply and an element-wise add anyway, so a
``MatMul + Add`` stays as it is (the bias stays float).
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS
from qgraph.targets.conformance import LOADABLE_RULES
from qgraph.targets.runtime import MAX_ORT_IR_VERSION, MAX_ORT_OPSET, PER_CHANNEL_MIN_OPSET
from qgraph.targets.spec import (
    ActivationScheme,
    KernelProfile,
    QuantFormat,
    RuntimeProfile,
    TargetSpec,
    WeightScheme,
)
from qgraph.targets.tensorrt_rules import TENSORRT_RULES

TENSORRT_QUANTIZABLE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})

TENSORRT = TargetSpec(
    name="tensorrt",
    summary="TensorRT execution provider: int8 symmetric Q/DQ, zero points 0, no QOperator ops",
    arch=None,
    execution_provider="TensorrtExecutionProvider",
    format=QuantFormat.QDQ,
    dynamic_format=QuantFormat.QDQ,
    weight_only_format=QuantFormat.QDQ,
    activations=ActivationScheme(
        dtype=ir.DataType.INT8,
        symmetric=True,
        per_consumer=False,
        int16=False,
        int16_kernels=False,
        int16_digits=False,
    ),
    weights=WeightScheme(dtype=ir.DataType.INT8, symmetric=True, bits=8, per_channel=True),
    runtime=RuntimeProfile(
        min_opset=PER_CHANNEL_MIN_OPSET,
        max_opset=MAX_ORT_OPSET,
        max_ir_version=MAX_ORT_IR_VERSION,
        allowed_domains=ONNX_DOMAINS,
        default_domain_extensions=frozenset(),
    ),
    kernels=KernelProfile(
        quantizable_ops=TENSORRT_QUANTIZABLE_OPS,
        dynamic_quantizable_ops=TENSORRT_QUANTIZABLE_OPS,
        output_quantized_ops=frozenset(),
        output_quantized_chains=(),
        matmul_add_as_gemm=False,
        int32_bias=False,
        residual_inputs=True,
        activation_products=False,
        embeddings=False,
        dynamic_table_projection=False,
        # TensorRT's int8 kernels against fp16 ones, a rule of thumb, not measured here
        nominal_int8_speedup=2.0,
        runtime_checked=False,
    ),
    lowering_rules=(),
    conformance_rules=LOADABLE_RULES + TENSORRT_RULES,
)
