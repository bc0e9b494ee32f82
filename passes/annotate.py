"""Annotate: decide, per weighted op, which inputs are quantized and to what spec. No graph change.

The target says which op types it runs faster in integer arithmetic (``quantizable_ops``) and
in which types; the user's options say the mode and what to keep in float. For each candidate
op the pass records a ``NodeAnnotation`` on the node (``set_annotation``; insert-qdq takes it
with ``take_annotation``), or reports the reason it stays in float. Only the data inputs of
weighted ops are ever quantized (and, where the runtime fuses an op into an integer kernel
only behind a ``QuantizeLinear``, its output: ``KernelProfile.quantizes_output``), so shape
and index computations, masks and everything the target runs in float are left exact.

Weight specs are per output channel where the target says so: ``Conv`` weights ``[M, C/g, kH,
kW]`` on axis 0, ``ConvTranspose`` weights ``[C, M, kH, kW]`` on axis 1 (ungrouped only),
``MatMul`` weights ``[K, N]`` on axis 1, ``Gemm`` weights on axis 0 with ``transB=1`` and axis
1 without. Per-block weight specs (4-bit, in any mode) split the reduction axis ``K`` into
blocks, each with its own scale per output channel. Biases become int32 only where the target
says so (``int32_bias``).

Embedding tables (a ``Gather`` from a constant ``[V, H]`` table, and an output projection
``MatMul(h, Transpose(E))`` tied to it) get ``embedding_bits``, whatever the other weights get:
8 bits with one scale per row of ``E``, or 4 in blocks along each row. The tied projection's
spec is written for its weight ``E^T``: rows of ``E`` are its axis 1, blocks along ``H`` its
axis 0. Where GPTQ rounds 4-bit weights and the table is 4-bit, the projection is an ordinary
4-bit weight instead (``weight_dtype``, blocks along ``H``), stored as its own copy: GPTQ fits
it to the projection, and the embedding reads the table rounded to nearest. In weight-only
mode a tied projection of an 8-bit table has its activation quantized per tensor at run time
where the target's dynamic kernel beats its 8-bit weight-only one (``dynamic_table_projection``);
the table is then in the target's weight type.

A MatMul with 4-bit weights in dynamic mode reads its activation in float too, where the
target's runtime has ``MatMulNBits`` (``reads_float_activations``): at ``accuracy_level`` 4 that
kernel quantizes the activation to 8 bits per block as it runs, which is what dynamic mode asks
for, and onnxruntime has no other 4-bit kernel.

Where the target fuses a weighted op with the ``Add`` of a skip connection
(``kernels.residual_inputs``, static mode), an ``Add`` of an annotated op's output (after its
bias) and an activation that no weighted op produced gets a ``ResidualAnnotation``: its skip
input is quantized like an activation, and the op's output stays float.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import TypeVar

import onnx_ir as ir

from qgraph.graph.traversal import KEEP_FLOAT_KEY, all_nodes, subgraphs, weighted_producer
from qgraph.inspection import op_key
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.spec import QuantSpec
from qgraph.recipe import Mode, QuantOptions, RecipeError, WeightRounding
from qgraph.sections import QuantizationOutcome
from qgraph.targets import TargetSpec

COMPUTED_WEIGHT = "its weight is not a constant (both inputs are computed at run time)"
TABLE_4BIT = ir.DataType.UINT4
"""A 4-bit table has a zero point per block: on SmolLM2 with int4 GPTQ MatMuls (perplexity
ratio 1.169 with the table in 8 bits), a symmetric int4 table measured 1.324 and an
asymmetric one (uint4) 1.283, for the same file size."""


@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """Where a weighted op keeps its activation, weight and bias, and its weight's axes."""

    activation: int
    weight: int
    bias: int | None
    weight_rank: int | None
    channel_axis: Callable[[ir.Node], int]
    """The axis of the weight's output channels."""
    reduction_axis: Callable[[ir.Node], int | None]
    """The axis of the weight's reduction (K), or None where blocks do not apply."""
    unsupported: Callable[[ir.Node], str | None] = lambda node: None
    """Why this node of the op type cannot be quantized, if it cannot."""


def _grouped(node: ir.Node) -> str | None:
    if node.attributes.get_int("group", 1) == 1:
        return None
    return "a grouped ConvTranspose's weight [C, M/group, ...] has no axis of all its outputs"


def _gemm_transposed(node: ir.Node) -> bool:
    attribute = node.attributes.get("transB")
    return bool(attribute.as_int()) if attribute is not None else False


WEIGHT_LAYOUTS = {
    "Conv": WeightedOp(0, 1, 2, None, lambda node: 0, lambda node: None),
    "ConvTranspose": WeightedOp(0, 1, 2, None, lambda node: 1, lambda node: None, _grouped),
    "MatMul": WeightedOp(0, 1, None, 2, lambda node: 1, lambda node: 0),
    "Gemm": WeightedOp(
        0,
        1,
        2,
        2,
        lambda node: 0 if _gemm_transposed(node) else 1,
        lambda node: 1 if _gemm_transposed(node) else 0,
    ),
}
"""The layout of each op type qgraph knows how to quantize: one per
``qgraph.graph.ops.WEIGHTED_OPS``."""


@dataclasses.dataclass(frozen=True)
class NodeAnnotation:
    """What of one node is quantized: its activation input, its weight, maybe its bias."""

    activation: int | None
    activation_spec: QuantSpec | None
    weight: int
    weight_spec: QuantSpec
    bias: int | None
    output_spec: QuantSpec | None = None
    """Set where the runtime fuses the op only with a Q on its output (static mode)."""
    computed_weight: bool = False
    """The "weight" is computed at run time (attention's ``Q K^T``, ``P V``): it is quantized
    per tensor like an activation, with ``weight_spec`` its activation spec."""
    own_weight_copy: bool = False
    """The weight is ``Transpose(E)`` of an embedding table, stored as the projection's own
    copy rather than through the table an embedding shares (module docstring)."""


@dataclasses.dataclass(frozen=True)
class EmbeddingAnnotation:
    """A ``Gather`` of rows from a constant table, and the table's per-row spec."""

    spec: QuantSpec


@dataclasses.dataclass(frozen=True)
class ResidualAnnotation:
    """The skip input of a residual ``Add`` after an annotated op, and its spec."""

    skip: int
    spec: QuantSpec


@dataclasses.dataclass(frozen=True)
class KeepFloat:
    """An op the target could quantize that stays in float, and why."""

    reason: str


Annotation = NodeAnnotation | EmbeddingAnnotation | ResidualAnnotation
"""What annotate hands insert-qdq on a node: at most one per node (weighted ops, embedding
Gathers and residual Adds are different nodes)."""

_ANNOTATION_KEY = "qgraph.annotation"
"""The ``node.meta`` key (in memory, never saved) holding a node's ``Annotation``."""

AnnotationKind = TypeVar("AnnotationKind", NodeAnnotation, EmbeddingAnnotation, ResidualAnnotation)


def set_annotation(node: ir.Node, annotation: Annotation) -> None:
    """Hand ``annotation`` to insert-qdq on ``node``."""
    node.meta[_ANNOTATION_KEY] = annotation


def annotation(node: ir.Node, kind: type[AnnotationKind]) -> AnnotationKind | None:
    """``node``'s annotation if it is a ``kind``, else None."""
    found = node.meta.get(_ANNOTATION_KEY)
    return found if isinstance(found, kind) else None


def take_annotation(node: ir.Node, kind: type[AnnotationKind]) -> AnnotationKind | None:
    """``node``'s annotation if it is a ``kind`` (removed from the node), else None."""
    found = annotation(node, kind)
    if found is not None:
        del node.meta[_ANNOTATION_KEY]
    return found


def annotation_problems(model: ir.Model) -> list[str]:
    """Nodes of the main graph whose annotation is no ``Annotation``, one line each."""
    return [
        f"node '{node.name}' carries {type(found).__name__}, not an annotation"
        for node in model.graph
        if (found := node.meta.get(_ANNOTATION_KEY)) is not None
        and not isinstance(found, Annotation)
    ]


@dataclasses.dataclass
class AnnotationReport:
    """How many ops of each type were annotated, and why the others stay in float."""

    annotated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    float_reasons: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Node name -> (op type, reason)."""
    residual_inputs: int = 0
    embeddings: int = 0
    unquantized: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """(op, reason) -> how many of the other ops stay in float, which the target never
    quantizes."""

    def outcome(self) -> QuantizationOutcome:
        """The weighted ops kept float, and the others the target never quantizes."""
        return QuantizationOutcome(
            left_in_float=dict(self.float_reasons), never_quantized=self.unquantized.copy()
        )


class AnnotatePass(ir.passes.InPlacePass):
    """Record a ``NodeAnnotation`` (or a float reason) on every weighted op of the main graph."""

    def __init__(self, target: TargetSpec, options: QuantOptions) -> None:
        super().__init__()
        self.target = target
        self.options = options

    def call(self, model: ir.Model) -> ReportingPassResult:
        report = AnnotationReport()
        for node in model.graph:
            if self._annotate_embedding(node, report):
                continue
            decision = self.decide(node)
            if decision == KeepFloat(COMPUTED_WEIGHT):
                decision = self._activation_product(node) or decision
            if decision is None:
                report.unquantized[(op_key(node), self._never_quantized)] += 1
            elif isinstance(decision, KeepFloat):
                report.float_reasons[node.name or "?"] = (node.op_type, decision.reason)
            else:
                set_annotation(node, decision)
                report.annotated[node.op_type] += 1
        if self.target.kernels.residual_inputs and self.options.mode is Mode.STATIC:
            report.residual_inputs = self._annotate_residuals(model)
        self._list_subgraph_ops(model, report)
        return ReportingPassResult(model, modified=False, details=report)

    def _list_subgraph_ops(self, model: ir.Model, report: AnnotationReport) -> None:
        """Ops the target could quantize inside If / Loop / Scan bodies stay float, listed:
        calibration sees only the main graph's values."""
        for owner in model.graph:
            for body in subgraphs(owner):
                for node in all_nodes(body):
                    if node.op_type not in self._quantizable_ops or node.domain != "":
                        continue
                    where = f"{owner.op_type} '{owner.name}'"
                    reason = f"inside a subgraph of {where}: qgraph calibrates the main graph"
                    report.float_reasons[node.name or "?"] = (node.op_type, reason)

    def _annotate_embedding(self, node: ir.Node, report: AnnotationReport) -> bool:
        """Mark a ``Gather`` from an embedding table the target stores in integers; whether
        ``node`` is such a Gather (quantized, or kept float with a reason)."""
        if not self.target.kernels.embeddings or embedding_table(node) is None:
            return False
        reason = self.options.excluded(node)
        if reason:
            report.float_reasons[node.name or "?"] = (node.op_type, reason)
            return True
        set_annotation(node, EmbeddingAnnotation(self._table_spec(axis=0, block_axis=1)))
        report.embeddings += 1
        return True

    def _annotate_residuals(self, model: ir.Model) -> int:
        """Mark the skip input of every residual ``Add`` after an annotated op; how many."""
        count = 0
        for node in model.graph:
            skip = _residual_skip(node)
            if skip is None or self.options.excluded(node):
                continue
            spec = self._activation_spec(node.inputs[skip])
            set_annotation(node, ResidualAnnotation(skip, spec))
            count += 1
        return count

    @property
    def _quantizable_ops(self) -> frozenset[str]:
        if self.options.mode is Mode.DYNAMIC:
            return self.target.kernels.dynamic_quantizable_ops
        return self.target.kernels.quantizable_ops

    @property
    def _never_quantized(self) -> str:
        ops = ", ".join(sorted(self._quantizable_ops))
        dynamic = " in dynamic mode" if self.options.mode is Mode.DYNAMIC else ""
        return f"target {self.target.name} quantizes only {ops}{dynamic}"

    def decide(self, node: ir.Node) -> NodeAnnotation | KeepFloat | None:
        """What of ``node`` to quantize, why it stays in float, or None for a node the target
        never quantizes. Reads the graph only (SmoothQuant asks before annotating)."""
        if node.op_type not in self._quantizable_ops or node.domain != "":
            return None
        layout = WEIGHT_LAYOUTS.get(node.op_type)
        if layout is None:
            return KeepFloat(f"qgraph has no quantization rule for {node.op_type}")
        reason = (
            node.metadata_props.get(KEEP_FLOAT_KEY)
            or self.options.excluded(node)
            or layout.unsupported(node)
            or _weight_problem(node, layout)
        )
        if reason:
            return KeepFloat(reason)
        activation = _input(node, layout.activation)
        float_activation = self.options.mode is Mode.WEIGHT_ONLY or (
            node.op_type == "MatMul" and reads_float_activations(self.target, self.options)
        )
        weight_only = float_activation and not self._dynamic_projection(node)
        activation_spec = None if weight_only else self._activation_spec(activation)
        return NodeAnnotation(
            activation=None if weight_only else layout.activation,
            activation_spec=activation_spec,
            weight=layout.weight,
            weight_spec=self._weight_spec(node, layout),
            bias=self._bias(node, layout),
            output_spec=self._output_spec(node, activation_spec),
            own_weight_copy=self._tied(node, layout) and self._own_projection_copies,
        )

    def _activation_product(self, node: ir.Node) -> NodeAnnotation | None:
        """Both inputs of a MatMul quantized per tensor, where the target multiplies two
        computed 8-bit tensors in integers (static mode); None elsewhere."""
        if not self.target.kernels.activation_products or self.options.mode is not Mode.STATIC:
            return None
        if node.op_type != "MatMul" or any(
            v is None or v.dtype != ir.DataType.FLOAT for v in node.inputs
        ):
            return None
        first, second = node.inputs
        return NodeAnnotation(
            activation=0,
            activation_spec=self._activation_spec(first),
            weight=1,
            weight_spec=self._activation_spec(second),
            bias=None,
            computed_weight=True,
        )

    def _output_spec(self, node: ir.Node, activation: QuantSpec | None) -> QuantSpec | None:
        """The spec of the op's output where the target fuses the op only behind a Q; none
        where a 16-bit activation runs as 8-bit digits, whose products give float."""
        if not self.target.kernels.quantizes_output(node):
            return None
        if activation is not None and self.target.activations.as_digits(activation.width):
            return None
        if self.options.mode is not Mode.STATIC or node.outputs[0].is_graph_output():
            return None
        return self._activation_spec(node.outputs[0])

    def _dynamic_projection(self, node: ir.Node) -> bool:
        """Whether ``node`` is an output projection tied to an 8-bit table whose activation
        the target quantizes at run time even in weight-only mode
        (``dynamic_table_projection``)."""
        return (
            self._dynamic_tables
            and node.op_type == "MatMul"
            and transposed_table(node.inputs[WEIGHT_LAYOUTS["MatMul"].weight]) is not None
        )

    @property
    def _dynamic_tables(self) -> bool:
        """8-bit tables stored in the target's weight type for a dynamic projection."""
        return (
            self.target.kernels.dynamic_table_projection
            and self.options.mode is Mode.WEIGHT_ONLY
            and self.options.embedding_bits == 8
        )

    @property
    def _own_projection_copies(self) -> bool:
        """Tied projections of 4-bit tables are ordinary 4-bit weights, each its own copy of
        the table (insert-qdq), where GPTQ rounds them."""
        return (
            self.options.embedding_bits == 4
            and self.options.weight_dtype.bitwidth == 4
            and self.options.weight_rounding is WeightRounding.GPTQ
        )

    def _activation_spec(self, value: ir.Value) -> QuantSpec:
        override = self.options.override(value.name or "")
        wide = override.dtype is not None and override.dtype.bitwidth == 16
        if wide and not self.target.activations.int16:
            raise RecipeError(
                f"tensor '{value.name}': target {self.target.name} has no 16-bit activations"
            )
        dtype = override.dtype or self.target.activations.dtype
        if value.name in self.options.sixteen_bit:
            dtype = self.target.activations.sixteen_bit_type
        return QuantSpec(
            dtype=dtype,
            symmetric=self.target.activations.symmetric,
            method=override.method or self.options.calib_method,
        )

    def _table_spec(self, axis: int, block_axis: int) -> QuantSpec:
        """The spec of an embedding table (``embedding_bits``): 8 bits per row on ``axis``, in
        the target's weight type (int8 in weight-only mode, unless its projection runs
        dynamic there), or 4 in blocks on ``block_axis``, asymmetric (``TABLE_4BIT``) whatever
        ``weight_dtype`` is."""
        if self.options.embedding_bits == 4:
            return QuantSpec(
                TABLE_4BIT, symmetric=False, axis=block_axis, block_size=self.options.block_size
            )
        if self.options.mode is Mode.WEIGHT_ONLY and not self._dynamic_tables:
            return QuantSpec(ir.DataType.INT8, symmetric=True, axis=axis)
        return QuantSpec(
            dtype=self.target.weights.dtype,
            symmetric=self.target.weights.symmetric,
            bits=self.target.weights.bits,
            axis=axis,
        )

    @staticmethod
    def _tied(node: ir.Node, layout: WeightedOp) -> bool:
        """Whether ``node`` is an output projection tied to an embedding table."""
        return node.op_type == "MatMul" and transposed_table(node.inputs[layout.weight]) is not None

    def _weight_spec(self, node: ir.Node, layout: WeightedOp) -> QuantSpec:
        if self._tied(node, layout) and not self._own_projection_copies:
            return self._table_spec(axis=1, block_axis=0)  # E^T [H, V]: rows of E on axis 1
        channel_axis = layout.channel_axis(node) if self.target.weights.per_channel else None
        four_bit = self.options.weight_dtype.bitwidth == 4
        if self.options.mode is not Mode.WEIGHT_ONLY and not four_bit:
            return QuantSpec(
                dtype=self.target.weights.dtype,
                symmetric=self.target.weights.symmetric,
                bits=self.target.weights.bits,
                axis=channel_axis,
            )
        dtype = self.options.weight_dtype
        reduction_axis = layout.reduction_axis(node)
        if four_bit and reduction_axis is not None:
            return QuantSpec(
                dtype,
                symmetric=dtype.is_signed(),
                axis=reduction_axis,
                block_size=self.options.block_size,
            )
        return QuantSpec(dtype, symmetric=dtype.is_signed(), axis=channel_axis)

    def _bias(self, node: ir.Node, layout: WeightedOp) -> int | None:
        """The bias input, when it can become int32 (static mode, a constant vector or a
        ``[1, N]`` row, a target that takes int32 biases)."""
        if (
            layout.bias is None
            or self.options.mode is not Mode.STATIC
            or not self.target.kernels.int32_bias
        ):
            return None
        bias = _input(node, layout.bias)
        if bias is None or bias.const_value is None or not _is_row(bias.const_value.shape):
            return None
        return layout.bias if bias.dtype == ir.DataType.FLOAT else None


NBITS_RULE = "matmul-nbits"
"""The lowering rule (``qgraph.passes.lowering``) that writes a 4-bit weight-only MatMul as
``MatMulNBits``; a target lists it where its runtime has that kernel."""


def reads_float_activations(target: TargetSpec, options: QuantOptions) -> bool:
    """Whether the quantized MatMuls read float activations: in weight-only mode, and in
    dynamic mode with 4-bit weights on a target whose runtime has ``MatMulNBits``, which
    quantizes the activation itself (module docstring)."""
    if options.mode is Mode.WEIGHT_ONLY:
        return True
    return (
        options.mode is Mode.DYNAMIC
        and options.weight_dtype.bitwidth == 4
        and NBITS_RULE in target.lowering_rules
    )


def _weight_problem(node: ir.Node, layout: WeightedOp) -> str | None:
    """Why ``node``'s inputs cannot be quantized as ``layout`` says, or None where they can."""
    weight = _input(node, layout.weight)
    if _input(node, layout.activation) is None or weight is None:
        return "an input is missing"
    table = transposed_table(weight) if node.op_type == "MatMul" else None
    constant = weight if table is None else table
    if constant.const_value is None or not constant.is_initializer():
        return COMPUTED_WEIGHT
    if constant.const_value.dtype != ir.DataType.FLOAT:
        return "its weight is not float32"  # the activation has its type (ONNX typing)
    rank = len(constant.const_value.shape)
    if layout.weight_rank is not None and rank != layout.weight_rank:
        return f"its weight has rank {rank}, not {layout.weight_rank}"
    return None


def embedding_table(node: ir.Node) -> ir.Value | None:
    """The table of a ``Gather`` of rows from a constant float ``[V, H]`` initializer."""
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0):
        return None
    table = node.inputs[0]
    if table is None or not table.is_initializer() or table.const_value is None:
        return None
    if table.const_value.dtype != ir.DataType.FLOAT or len(table.const_value.shape) != 2:
        return None
    return table


def transposed_table(weight: ir.Value) -> ir.Value | None:
    """The 2-D float initializer ``E`` of a weight computed as ``Transpose(E)`` (a tied output
    projection reading an embedding table), or None."""
    producer = weight.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return None
    source = producer.inputs[0]
    perm = producer.attributes.get_ints("perm", [1, 0])
    if list(perm) != [1, 0] or not source.is_initializer() or source.const_value is None:
        return None
    return source if len(source.const_value.shape) == 2 else None


def _is_row(shape: ir.Shape) -> bool:
    """A vector, or a matrix of one row (a Gemm ``C`` exported as ``[1, N]``)."""
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _residual_skip(node: ir.Node) -> int | None:
    """For an ``Add`` of an annotated op's output and an activation no weighted op produced:
    the index of that activation (the skip input); None for any other node."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return None
    if any(v is None or v.const_value is not None for v in node.inputs):
        return None
    sources = [weighted_producer(v) for v in node.inputs]
    annotated = [s is not None and annotation(s, NodeAnnotation) is not None for s in sources]
    if annotated.count(True) != 1 or sources.count(None) != 1:
        return None
    return sources.index(None)


BUILDERS: dict[str, PassBuilder] = {
    "annotate": lambda ctx: (
        None
        if ctx.options.quantization is None
        else AnnotatePass(ctx.target, ctx.options.quantization)
    ),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
