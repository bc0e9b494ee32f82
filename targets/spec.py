"""What a target is: a frozen record of the facts passes read, and the rules its output obeys.

Passes never ask for a target's name; they read these fields. Adding a target is adding a record
(see ``x86.py``, ``arm.py``, ``tensorrt.py``), plus code only for a genuinely new lowering rule or
conformance rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable

import onnx_ir as ir


class QuantFormat(str, enum.Enum):
    """How a quantized op is written: Q/DQ pairs around float ops, or integer operators."""

    QDQ = "qdq"
    QOPERATOR = "qoperator"


@dataclasses.dataclass(frozen=True)
class Violation:
    """One way a model breaks a target's rules."""

    rule: str
    message: str
    node: str | None = None

    def __str__(self) -> str:
        where = f" (node '{self.node}')" if self.node else ""
        return f"{self.rule}: {self.message}{where}"


ConformanceRule = Callable[[ir.Model, "TargetSpec"], Iterable[Violation]]
"""A check of a compiled model against a target; it yields what it finds wrong."""


@dataclasses.dataclass(frozen=True)
class OutputChain:
    """``op -> activation -> one of readers``: a chain along which the runtime runs a Q/DQ
    ``op`` in float unless a Q reads the op's output."""

    op: str
    activation: str
    readers: frozenset[str]

    def matches(self, node: ir.Node) -> bool:
        """``node`` is ``op``, its output's only reader ``activation``, read by a ``readers``."""
        if node.op_type != self.op or not node.outputs:
            return False
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != self.activation:
            return False
        return any(use.node.op_type in self.readers for use in uses[0].node.outputs[0].uses())

    def __str__(self) -> str:
        return f"{self.op} -> {self.activation} -> {' | '.join(sorted(self.readers))}"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """The facts about one deployment target that the pipeline's passes read.

    Attributes:
        name: The name users select it by (``--target``).
        summary: One line on what it emits and why.
        arch: The host architecture (``platform.machine()`` spelling) whose CPU runs the output,
            or None for an accelerator.
        execution_provider: The onnxruntime execution provider that runs the output.
        format: Q/DQ pairs or QOperator ops.
        activation_dtype: Integer type of quantized activations.
        weight_dtype: Integer type of quantized weights.
        activation_symmetric: Activations use zero point 0.
        weight_symmetric: Weights use zero point 0.
        weight_bits: Bits of the weight range actually used (7 where int16 accumulation of
            u8 x s8 products would otherwise saturate).
        per_channel_weights: Weights get one scale per output channel.
        qdq_per_consumer: Each consumer of a quantized activation gets its own Q/DQ pair
            (kernels fuse a Q/DQ only when it has a single consumer).
        int16_activations: The runtime accepts 16-bit activation Q/DQ (a user may ask for it).
        int16_kernels: The runtime computes with 16-bit activations in integer arithmetic, so
            an activation too noisy in 8 bits goes to 16; without such kernels its readers
            stay in float instead (a 16-bit Q/DQ in front of a float op only adds rounding).
        quantizable_ops: Op types this target runs faster in integer arithmetic.
        lowering_rules: The lowering rules (``qgraph.passes.lowering``) whose operators the
            runtime has kernels for, applied when the QOperator format is asked for.
        min_opset: Lowest default-domain opset the output may use.
        max_ir_version: Highest IR version the runtime loads.
        max_opset: Highest default-domain opset the runtime loads.
        allowed_domains: Operator domains the runtime executes.
        default_domain_extensions: Ops the runtime adds to the default ONNX domain (not in the
            ONNX standard, so the ONNX checker does not know them).
        matmul_add_as_gemm: A 2-D ``MatMul + Add(bias)`` is better as ``Gemm`` (one op whose
            bias quantizes to int32) than the other way round.
        conformance_rules: Checks every compiled model must pass.
        int32_bias: Biases of quantized ops become int32 at scale ``s_x * s_w``, which integer
            kernels add to their accumulator; otherwise they stay float (a runtime whose
            DequantizeLinear takes no int32 input).
        quantize_residual_inputs: The skip input of a residual ``Add`` that follows a quantized
            weighted op gets a Q/DQ pair too (the op's own output stays float), so the runtime
            fuses op, bias and Add into one int8 kernel.
        activation_products: A ``MatMul`` of two computed tensors (attention's ``Q K^T`` and
            ``P V``) runs in integers with both inputs quantized per tensor (static mode).
        quantized_embeddings: Embedding tables (``Gather`` from a constant ``[V, H]``, and a
            tied output projection reading ``Transpose`` of the same table) are stored in the
            weight type, one scale per row; the runtime gathers integer rows and scales them.
        output_quantized_ops: Op types the runtime runs as an integer kernel only when a
            ``QuantizeLinear`` reads their output (directly, or through a Relu or Clip it
            folds into that Q): onnxruntime's ``QLinearConv``. Their outputs get a Q/DQ pair
            of their own where no such Q follows already.
        output_quantized_chains: Where a Q/DQ op of another type also needs a Q on its output
            to run as an integer kernel: when its output flows through ``activation`` into
            one of ``readers`` (``OutputChain``). Such an op gets a Q/DQ on its output too
            (``quantizes_output``).
        dynamic_quantizable_ops: The ``quantizable_ops`` of dynamic mode (activation scales
            computed at run time), where integer kernels of that kind are faster than float.
        dynamic_format: The format of dynamic-mode output, where it differs from ``format``:
            onnxruntime's CPU provider fuses no ``DynamicQuantizeLinear -> DQ`` group into an
            integer kernel, but runs the lowered ``MatMulIntegerToFloat`` and ``QGemm``.
        weight_only_format: The format of weight-only output, where it differs from
            ``format``: onnxruntime's own ``DQ -> MatMulNBits`` fusion gives symmetric int4
            weights an explicit zero point of 8, whose kernel decoded SmolLM2 6% slower than
            the lowered ``MatMulNBits`` without one.
        dynamic_table_projection: In weight-only mode, an output projection tied to an 8-bit
            embedding table quantizes its activation per tensor at run time
            (``DynamicQuantizeLinear``; onnxruntime fuses the group into
            ``DynamicQuantizeMatMul``) instead of running as an 8-bit ``MatMulNBits``, and
            the table is stored in ``weight_dtype``. On AVX2 (no VNNI) SmolLM2's 576 x 49152
            projection took 3.9 ms a token that way against 5.4 ms, a third of a decode step;
            ``MatMulNBits`` at 8 bits ran 2-3x slower than fp32 at 128 rows. The body's
            MatMuls keep blocks: per-tensor activations there cost SmolLM2 a perplexity ratio
            of 1.56, against 1.169 -> 1.179 for the projection alone.
        nominal_int8_speedup: How much faster the runtime's int8 matrix products run than
            fp32 ones on this kind of target, assumed by the cost model that stands in for
            timing with ``--no-measure`` (``qgraph.timing.CostModel``); measured timings
            replace it by default.
        runtime_checked: After compiling, qgraph asks the runtime which quantized ops it runs
            as integer kernels (``qgraph.kernels``), on a host of the target's ``arch``.
    """

    name: str
    summary: str
    arch: str | None
    execution_provider: str
    format: QuantFormat
    activation_dtype: ir.DataType
    weight_dtype: ir.DataType
    activation_symmetric: bool
    weight_symmetric: bool
    weight_bits: int
    per_channel_weights: bool
    qdq_per_consumer: bool
    int16_activations: bool
    int16_kernels: bool
    quantizable_ops: frozenset[str]
    lowering_rules: tuple[str, ...]
    min_opset: int
    max_ir_version: int
    max_opset: int
    allowed_domains: frozenset[str]
    default_domain_extensions: frozenset[str]
    matmul_add_as_gemm: bool
    conformance_rules: tuple[ConformanceRule, ...]
    int32_bias: bool
    quantize_residual_inputs: bool
    activation_products: bool
    quantized_embeddings: bool
    output_quantized_ops: frozenset[str]
    output_quantized_chains: tuple[OutputChain, ...]
    dynamic_quantizable_ops: frozenset[str]
    dynamic_format: QuantFormat
    weight_only_format: QuantFormat
    dynamic_table_projection: bool
    nominal_int8_speedup: float
    runtime_checked: bool

    def quantizes_output(self, node: ir.Node) -> bool:
        """The runtime runs ``node`` as an integer kernel only with a Q reading its output."""
        if node.op_type in self.output_quantized_ops:
            return True
        return any(chain.matches(node) for chain in self.output_quantized_chains)

    def check(self, model: ir.Model) -> list[Violation]:
        """Every violation of this target's rules in ``model``; empty when it conforms."""
        return [v for rule in self.conformance_rules for v in rule(model, self)]

    def describe(self) -> dict[str, object]:
        """The fields as plain values, for tables and JSON."""
        return {
            "name": self.name,
            "summary": self.summary,
            "arch": self.arch,
            "execution_provider": self.execution_provider,
            "format": self.format.value,
            "activations": _dtype_text(self.activation_dtype, self.activation_symmetric),
            "weights": _dtype_text(self.weight_dtype, self.weight_symmetric, self.weight_bits),
            "per_channel_weights": self.per_channel_weights,
            "qdq_per_consumer": self.qdq_per_consumer,
            "int16_activations": self.int16_activations,
            "int16_kernels": self.int16_kernels,
            "quantizable_ops": sorted(self.quantizable_ops),
            "lowering_rules": list(self.lowering_rules),
            "min_opset": self.min_opset,
            "max_ir_version": self.max_ir_version,
            "max_opset": self.max_opset,
            "allowed_domains": sorted({d or "ai.onnx" for d in self.allowed_domains}),
            "default_domain_extensions": sorted(self.default_domain_extensions),
            "matmul_add_as_gemm": self.matmul_add_as_gemm,
            "conformance_rules": [rule.__name__ for rule in self.conformance_rules],
            "int32_bias": self.int32_bias,
            "quantize_residual_inputs": self.quantize_residual_inputs,
            "activation_products": self.activation_products,
            "quantized_embeddings": self.quantized_embeddings,
            "output_quantized_ops": sorted(self.output_quantized_ops),
            "output_quantized_chains": [str(chain) for chain in self.output_quantized_chains],
            "dynamic_quantizable_ops": sorted(self.dynamic_quantizable_ops),
            "dynamic_format": self.dynamic_format.value,
            "weight_only_format": self.weight_only_format.value,
            "dynamic_table_projection": self.dynamic_table_projection,
            "nominal_int8_speedup": self.nominal_int8_speedup,
            "runtime_checked": self.runtime_checked,
        }


def _dtype_text(dtype: ir.DataType, symmetric: bool, bits: int | None = None) -> str:
    text = dtype.name.lower()
    if bits is not None and bits != dtype.bitwidth:
        text += f" ({bits}-bit range)"
    return text + (" symmetric" if symmetric else " asymmetric")
