"""Facts about onnxruntime shared by every target it runs.

The IR version and ai.onnx opset onnxruntime accepts change with its release (1.23: IR 11,
opset 23; 1.31: IR 13, opset 26) and it reports neither, so they are measured: one-node
models are offered to the installed onnxruntime, once per process (a few milliseconds).
The installed runtime is the one qgraph verifies with and, by default, the one it targets.
"""

from __future__ import annotations

import dataclasses
import functools

import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from qgraph.graph.ops import MICROSOFT_DOMAIN, ONNX_DOMAINS, ONNX_ML_DOMAIN
from qgraph.targets.conformance import LOADABLE_RULES
from qgraph.targets.spec import (
    ActivationScheme,
    KernelProfile,
    OutputChain,
    QuantFormat,
    RuntimeProfile,
    TargetSpec,
    WeightScheme,
)

CPU_DOMAINS = ONNX_DOMAINS | {ONNX_ML_DOMAIN, MICROSOFT_DOMAIN}
"""Operator domains onnxruntime's CPU execution provider runs."""

CPU_DEFAULT_DOMAIN_EXTENSIONS = frozenset({"SimplifiedLayerNormalization", "LayerNormalization"})
"""Ops onnxruntime registers in the default ONNX domain itself: RMSNorm before opset 23, and
LayerNorm before opset 17 (onnxruntime 1.32 ran it at opsets 11-16, exact to float rounding)."""

CPU_SLOWER_FUSIONS = frozenset({"SkipLayerNormalization"})
"""onnxruntime fuses a residual ``Add`` and the ``LayerNormalization`` reading it into
``SkipLayerNormalization`` (level 2 optimizations), whose CPU kernel is a scalar loop with a
division per element: 5.0-5.3x slower than the two ops left apart at MiniLM's and SmolLM2's
shapes (``benchmarks/slower_fusions.md``; onnxruntime 1.32, one thread)."""

CPU_QUANTIZABLE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
"""Ops with integer CPU kernels that beat fp32; quantizing more mostly costs accuracy."""

CPU_DYNAMIC_QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm"})
"""With activation scales computed at run time: onnxruntime's dynamic ``ConvInteger`` path ran
7.6x slower than the float Conv on the reference CNN (AVX512-VNNI host), so Conv stays float."""

CPU_OUTPUT_QUANTIZED_OPS = frozenset({"Conv"})
"""onnxruntime fuses ``DQ -> Conv`` into ``QLinearConv`` only with a Q after the Conv (or after a
Relu/Clip it folds into the Q); ``DQ -> MatMul`` and ``DQ -> Gemm`` fuse with a float output too
(``MatMulIntegerToFloat``, ``QGemm``). Measured: a Conv + SiLU quantized as one unit ran in float
with its weight dequantized on every run."""

CPU_OUTPUT_QUANTIZED_CHAINS = (OutputChain("Gemm", "Relu", frozenset({"MatMul", "Gemm"})),)
"""Measured (onnxruntime 1.32): a Q/DQ ``Gemm`` whose Relu a float ``MatMul`` or ``Gemm`` reads
runs as a float ``FusedGemm`` (Gemm + Relu) with its weight dequantized on every run; with a
Q on its output it runs as ``QGemm``. Followed by Sigmoid, Tanh, LeakyRelu, Elu, Softplus or
HardSigmoid, or by a Relu that an ``Add`` or the graph output reads, it runs as ``QGemm``
with a float output."""

CPU_LOWERING_RULES = (
    "qlinear-conv",
    "qlinear-matmul",
    "qlinear-add",
    "qlinear-mul",
    "qlinear-sigmoid",
    "qlinear-leaky-relu",
    "qlinear-concat",
    "qlinear-global-average-pool",
    "qlinear-average-pool",
    "qlinear-softmax",
    "qgemm",
    "matmul-integer-to-float",
    "conv-integer",
    "matmul-nbits",
    "weight-only-bias-sum",
)
"""The lowering rules (``qgraph.passes.lowering``) whose ops the CPU provider has kernels for."""

PER_CHANNEL_MIN_OPSET = 13
"""DequantizeLinear gained ``axis`` (per-channel scales) in opset 13."""

_IR_RANGE = (7, onnx.IR_VERSION)
_OPSET_RANGE = (13, onnx.defs.onnx_opset_version())


@dataclasses.dataclass(frozen=True)
class RuntimeLimits:
    """What the installed onnxruntime loads."""

    version: str
    max_ir_version: int
    max_opset: int


def _loads(ir_version: int, opset: int) -> bool:
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime refuses with several exception types
        return False
    return True


def _highest(low: int, high: int, accepts) -> int:
    """The highest value in [low, high] that ``accepts``, assuming acceptance is monotone."""
    while low < high:
        middle = (low + high + 1) // 2
        if accepts(middle):
            low = middle
        else:
            high = middle - 1
    return low


@functools.cache
def onnxruntime_limits() -> RuntimeLimits:
    """The IR version and ai.onnx opset ceilings of the installed onnxruntime, measured."""
    max_ir = _highest(*_IR_RANGE, lambda v: _loads(v, _OPSET_RANGE[0]))
    max_opset = _highest(*_OPSET_RANGE, lambda v: _loads(max_ir, v))
    return RuntimeLimits(ort.__version__, max_ir, max_opset)


ORT_LIMITS = onnxruntime_limits()
MAX_ORT_IR_VERSION = ORT_LIMITS.max_ir_version
MAX_ORT_OPSET = ORT_LIMITS.max_opset


def cpu_target(
    name: str,
    summary: str,
    arch: str,
    activation_dtype: ir.DataType,
    weight_dtype: ir.DataType,
    per_consumer: bool,
    dynamic_table_projection: bool,
    nominal_int8_speedup: float,
    slow_subnormals: bool,
) -> TargetSpec:
    """A target run by onnxruntime's CPU execution provider: the fields every such target
    shares (Q/DQ written, fused by onnxruntime into the kernels above; symmetric 8-bit
    weights per channel; int32 biases; the loadable-model rules), with its own name,
    architecture, integer types, Q/DQ sharing, measured speed-up and cost of subnormals."""
    return TargetSpec(
        name=name,
        summary=summary,
        arch=arch,
        execution_provider="CPUExecutionProvider",
        format=QuantFormat.QDQ,
        dynamic_format=QuantFormat.QOPERATOR,
        weight_only_format=QuantFormat.QOPERATOR,
        activations=ActivationScheme(
            dtype=activation_dtype,
            symmetric=False,
            per_consumer=per_consumer,
            int16=True,
            int16_kernels=False,
            int16_digits=True,
        ),
        weights=WeightScheme(dtype=weight_dtype, symmetric=True, bits=8, per_channel=True),
        runtime=RuntimeProfile(
            min_opset=PER_CHANNEL_MIN_OPSET,
            max_opset=MAX_ORT_OPSET,
            max_ir_version=MAX_ORT_IR_VERSION,
            allowed_domains=CPU_DOMAINS,
            default_domain_extensions=CPU_DEFAULT_DOMAIN_EXTENSIONS,
            slower_fusions=CPU_SLOWER_FUSIONS,
            slow_subnormals=slow_subnormals,
        ),
        kernels=KernelProfile(
            quantizable_ops=CPU_QUANTIZABLE_OPS,
            dynamic_quantizable_ops=CPU_DYNAMIC_QUANTIZABLE_OPS,
            output_quantized_ops=CPU_OUTPUT_QUANTIZED_OPS,
            output_quantized_chains=CPU_OUTPUT_QUANTIZED_CHAINS,
            matmul_add_as_gemm=True,
            int32_bias=True,
            residual_inputs=False,
            activation_products=True,
            embeddings=True,
            dynamic_table_projection=dynamic_table_projection,
            nominal_int8_speedup=nominal_int8_speedup,
            runtime_checked=True,
        ),
        lowering_rules=CPU_LOWERING_RULES,
        conformance_rules=LOADABLE_RULES,
    )
