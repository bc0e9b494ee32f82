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
class ActivationScheme:
    """How a target quantizes activations.

    Attributes:
        dtype: Integer type of quantized activations (8 bits).
        symmetric: Activations use zero point 0.
        per_consumer: Each consumer of a quantized activation gets its own Q/DQ pair
            (kernels fuse a Q/DQ only when it has a single consumer).
        int16: The runtime accepts 16-bit activation Q/DQ (a user may ask for it).
        int16_kernels: The runtime computes with 16-bit activations in integer arithmetic, so
            an activation too noisy in 8 bits goes to 16; without such kernels its readers
            stay in float instead (a 16-bit Q/DQ in front of a float op only adds rounding).
        int16_digits: Without 16-bit kernels, the runtime's u8 x s8 product with a float
            output and per-column weight scales (``MatMulIntegerToFloat``) runs a 16-bit
            activation of a MatMul, Gemm or Conv with 8-bit weights as two 8-bit digits
            (``passes/lowering/digits.py``): the accuracy plan may ask for one where 8 bits
            are too coarse and two 8-bit products still beat float.
    """

    dtype: ir.DataType
    symmetric: bool
    per_consumer: bool
    int16: bool
    int16_kernels: bool
    int16_digits: bool

    def __post_init__(self) -> None:
        _require(self.dtype in _INT8_TYPES, f"activation dtype {self.dtype.name} is not 8-bit")
        _require(self.int16 or not self.int16_kernels, "16-bit kernels without 16-bit Q/DQ")
        _require(self.int16 or not self.int16_digits, "16-bit digits without 16-bit Q/DQ")

    @property
    def sixteen_bit_type(self) -> ir.DataType:
        """The 16-bit type of the activations' signedness."""
        return ir.DataType.INT16 if self.dtype.is_signed() else ir.DataType.UINT16

    def as_digits(self, bits: int) -> bool:
        """An activation of ``bits`` runs as two 8-bit digits on this target."""
        return bits == 16 and self.int16_digits and not self.int16_kernels


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How a target quantizes weights (8-bit ones; 4-bit blocks are the user's choice).

    Attributes:
        dtype: Integer type of quantized weights.
        symmetric: Weights use zero point 0 (or the middle of an unsigned range).
        bits: Bits of the weight range actually used (7 where int16 accumulation of u8 x s8
            products would otherwise saturate).
        per_channel: Weights get one scale per output channel.
    """

    dtype: ir.DataType
    symmetric: bool
    bits: int
    per_channel: bool

    def __post_init__(self) -> None:
        _require(self.dtype in _INT8_TYPES, f"weight dtype {self.dtype.name} is not 8-bit")
        _require(2 <= self.bits <= 8, f"weights in {self.bits} bits of an 8-bit type")


@dataclasses.dataclass(frozen=True)
class RuntimeProfile:
    """What the target's runtime loads.

    Attributes:
        min_opset: Lowest default-domain opset the output may use.
        max_opset: Highest default-domain opset the runtime loads.
        max_ir_version: Highest IR version the runtime loads.
        allowed_domains: Operator domains the runtime executes.
        default_domain_extensions: Ops the runtime adds to the default ONNX domain (not in the
            ONNX standard, so the ONNX checker does not know them).
        slower_fusions: Ops the runtime fuses out of standard ones by itself whose kernels run
            slower than the ops they replace; the compiled graph is written so that the
            runtime does not form them.
        slow_subnormals: The runtime's ``Softmax`` makes a subnormal number of every logit
            more than 87 below its row's maximum (a masked attention position), and the CPU
            takes a microcode assist for each (x86 without FTZ/DAZ): the compile floors such
            logits where that is faster (``qgraph.passes.softmax_floor``).
    """

    min_opset: int
    max_opset: int
    max_ir_version: int
    allowed_domains: frozenset[str]
    default_domain_extensions: frozenset[str]
    slower_fusions: frozenset[str] = frozenset()
    slow_subnormals: bool = False

    def __post_init__(self) -> None:
        _require(
            self.min_opset <= self.max_opset,
            f"min_opset {self.min_opset} is above max_opset {self.max_opset}",
        )


@dataclasses.dataclass(frozen=True)
class KernelProfile:
    """Which quantized ops the runtime runs as integer kernels, in which shapes, and how fast.

    Attributes:
        quantizable_ops: Op types this target runs faster in integer arithmetic.
        dynamic_quantizable_ops: The ``quantizable_ops`` of dynamic mode (activation scales
            computed at run time), where integer kernels of that kind are faster than float.
        output_quantized_ops: Op types the runtime runs as an integer kernel only when a
            ``QuantizeLinear`` reads their output (directly, or through a Relu or Clip it
            folds into that Q): onnxruntime's ``QLinearConv``. Their outputs get a Q/DQ pair
            of their own where no such Q follows already.
        output_quantized_chains: Where a Q/DQ op of another type also needs a Q on its output
            to run as an integer kernel: when its output flows through ``activation`` into
            one of ``readers`` (``OutputChain``). Such an op gets a Q/DQ on its output too
            (``quantizes_output``).
        matmul_add_as_gemm: A 2-D ``MatMul + Add(bias)`` is better as ``Gemm`` (one op whose
            bias quantizes to int32) than the other way round.
        int32_bias: Biases of quantized ops become int32 at scale ``s_x * s_w``, which integer
            kernels add to their accumulator; otherwise they stay float (a runtime whose
            DequantizeLinear takes no int32 input).
        residual_inputs: The skip input of a residual ``Add`` that follows a quantized
            weighted op gets a Q/DQ pair too (the op's own output stays float), so the runtime
            fuses op, bias and Add into one int8 kernel.
        activation_products: A ``MatMul`` of two computed tensors (attention's ``Q K^T`` and
            ``P V``) runs in integers with both inputs quantized per tensor (static mode).
        embeddings: Embedding tables (``Gather`` from a constant ``[V, H]``, and a tied output
            projection reading ``Transpose`` of the same table) are stored in the weight type,
            one scale per row; the runtime gathers integer rows and scales them.
        dynamic_table_projection: In weight-only mode, an output projection tied to an 8-bit
            embedding table quantizes its activation per tensor at run time
            (``DynamicQuantizeLinear``; onnxruntime fuses the group into
            ``DynamicQuantizeMatMul``) instead of running as an 8-bit ``MatMulNBits``, and
            the table is stored in the weight type. On AVX2 (no VNNI) SmolLM2's 576 x 49152
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

    quantizable_ops: frozenset[str]
    dynamic_quantizable_ops: frozenset[str]
    output_quantized_ops: frozenset[str]
    output_quantized_chains: tuple[OutputChain, ...]
    matmul_add_as_gemm: bool
    int32_bias: bool
    residual_inputs: bool
    activation_products: bool
    embeddings: bool
    dynamic_table_projection: bool
    nominal_int8_speedup: float
    runtime_checked: bool

    def __post_init__(self) -> None:
        _require(self.nominal_int8_speedup > 0, "nominal_int8_speedup must be positive")
        for field in ("dynamic_quantizable_ops", "output_quantized_ops"):
            extra = getattr(self, field) - self.quantizable_ops
            _require(not extra, f"{field} {sorted(extra)} are not quantizable_ops")

    def quantizes_output(self, node: ir.Node) -> bool:
        """The runtime runs ``node`` as an integer kernel only with a Q reading its output."""
        if node.op_type in self.output_quantized_ops:
            return True
        return any(chain.matches(node) for chain in self.output_quantized_chains)


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
        dynamic_format: The format of dynamic-mode output, where it differs from ``format``:
            onnxruntime's CPU provider fuses no ``DynamicQuantizeLinear -> DQ`` group into an
            integer kernel, but runs the lowered ``MatMulIntegerToFloat`` and ``QGemm``.
        weight_only_format: The format of weight-only output, where it differs from
            ``format``: onnxruntime's own ``DQ -> MatMulNBits`` fusion gives symmetric int4
            weights an explicit zero point of 8, whose kernel decoded SmolLM2 6% slower than
            the lowered ``MatMulNBits`` without one.
        activations: How activations are quantized.
        weights: How weights are quantized.
        runtime: What the runtime loads.
        kernels: Which quantized ops it runs as integer kernels, and how fast.
        lowering_rules: The lowering rules (``qgraph.passes.lowering``) whose operators the
            runtime has kernels for, applied when the QOperator format is asked for.
        conformance_rules: Checks every compiled model must pass.
    """

    name: str
    summary: str
    arch: str | None
    execution_provider: str
    format: QuantFormat
    dynamic_format: QuantFormat
    weight_only_format: QuantFormat
    activations: ActivationScheme
    weights: WeightScheme
    runtime: RuntimeProfile
    kernels: KernelProfile
    lowering_rules: tuple[str, ...]
    conformance_rules: tuple[ConformanceRule, ...]

    def check(self, model: ir.Model) -> list[Violation]:
        """Every violation of this target's rules in ``model``; empty when it conforms."""
        return [v for rule in self.conformance_rules for v in rule(model, self)]

    def describe(self) -> dict[str, object]:
        """The fields as plain values, for tables and JSON."""
        kernels, runtime = self.kernels, self.runtime
        return {
            "name": self.name,
            "summary": self.summary,
            "arch": self.arch,
            "execution_provider": self.execution_provider,
            "format": self.format.value,
            "activations": _scheme_text(self.activations.dtype, self.activations.symmetric),
            "weights": _scheme_text(self.weights.dtype, self.weights.symmetric, self.weights.bits),
            "per_channel_weights": self.weights.per_channel,
            "qdq_per_consumer": self.activations.per_consumer,
            "int16_activations": self.activations.int16,
            "int16_kernels": self.activations.int16_kernels,
            "int16_digits": self.activations.int16_digits,
            "quantizable_ops": sorted(kernels.quantizable_ops),
            "lowering_rules": list(self.lowering_rules),
            "min_opset": runtime.min_opset,
            "max_ir_version": runtime.max_ir_version,
            "max_opset": runtime.max_opset,
            "allowed_domains": sorted({d or "ai.onnx" for d in runtime.allowed_domains}),
            "default_domain_extensions": sorted(runtime.default_domain_extensions),
            "slower_fusions": sorted(runtime.slower_fusions),
            "matmul_add_as_gemm": kernels.matmul_add_as_gemm,
            "conformance_rules": [rule.__name__ for rule in self.conformance_rules],
            "int32_bias": kernels.int32_bias,
            "quantize_residual_inputs": kernels.residual_inputs,
            "activation_products": kernels.activation_products,
            "quantized_embeddings": kernels.embeddings,
            "output_quantized_ops": sorted(kernels.output_quantized_ops),
            "output_quantized_chains": [str(chain) for chain in kernels.output_quantized_chains],
            "dynamic_quantizable_ops": sorted(kernels.dynamic_quantizable_ops),
            "dynamic_format": self.dynamic_format.value,
            "weight_only_format": self.weight_only_format.value,
            "dynamic_table_projection": kernels.dynamic_table_projection,
            "nominal_int8_speedup": kernels.nominal_int8_speedup,
            "runtime_checked": kernels.runtime_checked,
        }


class TargetRecordError(ValueError):
    """A target record whose fields contradict each other or their domain."""


_INT8_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise TargetRecordError(problem)


def _scheme_text(dtype: ir.DataType, symmetric: bool, bits: int | None = None) -> str:
    text = dtype.name.lower()
    if bits is not None and bits != dtype.bitwidth:
        text += f" ({bits}-bit range)"
    return text + (" symmetric" if symmetric else " asymmetric")
