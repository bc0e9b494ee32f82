"""Conformance rules of the TensorRT target: what TensorRT's ONNX parser takes, and where it
wants Q/DQ.

Each rule is a function ``(model, target) -> Iterator[Violation]``, named for what it checks;
its violations name the node and the tensor at fault.

Refused by the parser (onnx-tensorrt ``docs/operators.md`` and ``QuantDequantLinearHelper``):

- ``no_qoperator_ops``: no QLinear*, ConvInteger, MatMulInteger, DynamicQuantizeLinear or
  onnxruntime's integer contrib ops; TensorRT runs quantized models as Q/DQ around float ops.
- ``qdq_types_int8``: Q/DQ quantize to int8. A DequantizeLinear of uint8 is refused, one of
  int32 (a bias) fails with "only activation types allowed as input to this layer", and a zero
  point of another type is read as int8 with only a warning. (TensorRT 10 also takes FP8, and
  INT4 / FP4 weights; this target emits int8 only.) com.microsoft Q/DQ are refused by the
  shared ``domains_supported`` rule.
- ``zero_points_zero``: "Non-zero zero point is not supported": quantization is symmetric.
- ``scales_positive``: "Scale coefficients must all be positive"; qgraph also refuses inf/NaN.

Placement (TensorRT developer guide, "Working with Quantized Types": per-tensor activations,
per-channel weights; "Q/DQ layer-placement recommendations"):

- ``activations_per_tensor``: one scale per activation tensor.
- ``per_channel_weight_axes``: per-channel scales only on constant weights read by Conv
  (axis 0), ConvTranspose (axis 1), MatMul (the last axis: 1 for [K, N]) or Gemm (0 with
  ``transB``, else 1), one scale per output channel.
- ``weighted_op_outputs_unquantized``: "by default, do not quantize the outputs of weighted
  operations", unless another weighted op reads them (it needs its inputs quantized). A Q/DQ
  between a Conv and the Add after it "forces the separation of the convolution from the
  element-wise addition".
- ``residual_inputs_quantized``: "quantize the residual input in skip connections": the other
  input of an Add after an int8 weighted op comes through Q/DQ, so TensorRT fuses op and Add
  into one kernel with an int8 output. Only that input: the op's own output stays float
  (NVIDIA's TensorFlow quantization toolkit, ``ResNetV1QDQCase``: "add Q/DQ nodes in the
  residual connection only (not between Add and Conv)"). An Add marked ``KEEP_FLOAT_KEY``
  is exempt: its skip input's calibration range cannot be held in 8 bits (an LLM's residual
  stream with massive activations), so TensorRT runs the op in int8 and the Add apart.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS, QDQ_OPS, WEIGHTED_OPS, is_qoperator
from qgraph.graph.traversal import KEEP_FLOAT_KEY, all_nodes, weighted_producer
from qgraph.targets.spec import TargetSpec, Violation

PASS_THROUGH_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "Identity", "Cast", "Transpose"}
)
"""Ops through which a constant stays a constant, for telling weights from activations. A
``Transpose`` of a constant is what a tied ``lm_head`` reads (the embedding table, shared);
TensorRT folds it into the constant (its ``ConstShuffleFusion``)."""

MAX_VALUES_SHOWN = 3


def no_qoperator_ops(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """No QOperator (integer) ops: TensorRT's parser has no QLinear*, ConvInteger,
    MatMulInteger or DynamicQuantizeLinear importer; it reads quantization as Q/DQ only."""
    for node in all_nodes(model.graph):
        if is_qoperator(node.op_type):
            yield Violation(
                "no_qoperator_ops",
                f"{node.op_type} is an integer (QOperator) op; {target.name} takes quantized "
                "models as QuantizeLinear/DequantizeLinear around float ops only",
                node.name,
            )


def qdq_types_int8(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Every Q/DQ quantizes to int8 (a QuantizeLinear without a zero point means uint8)."""
    for node in _qdq_nodes(model):
        dtype = _quantized_dtype(node)
        if dtype is None or dtype == ir.DataType.INT8:
            continue
        implicit = "" if _input(node, 2) is not None else " (it has no zero point)"
        yield Violation(
            "qdq_types_int8",
            f"{node.op_type} quantizes '{_data_name(node)}' to {dtype.name.lower()}{implicit}; "
            f"{target.name} takes int8 Q/DQ only",
            node.name,
        )


def zero_points_zero(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Every constant Q/DQ zero point is 0: TensorRT quantizes symmetrically."""
    for node in _qdq_nodes(model):
        zero_point = _input(node, 2)
        values = _constant_array(zero_point)
        if values is None or not values.any():
            continue
        yield Violation(
            "zero_points_zero",
            f"zero point '{zero_point.name}' of '{_data_name(node)}' holds "
            f"{_shown(values[values != 0])}; {target.name} quantizes symmetrically (zero point 0)",
            node.name,
        )


def scales_positive(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Every constant Q/DQ scale is finite and above 0."""
    for node in _qdq_nodes(model):
        scale = _input(node, 1)
        values = _constant_array(scale)
        if values is None:
            continue
        values = values.astype(np.float64)
        bad = values[~(np.isfinite(values) & (values > 0))]
        if bad.size:
            yield Violation(
                "scales_positive",
                f"scale '{scale.name}' of '{_data_name(node)}' holds {_shown(bad)}; "
                f"{target.name} needs every scale finite and above 0",
                node.name,
            )


def activations_per_tensor(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Activations (tensors computed at run time) are quantized with one scale each."""
    for node in _qdq_nodes(model):
        data = _input(node, 0)
        count = _scale_count(node)
        if data is None or _constant_source(data) is not None or count in (None, 1):
            continue
        yield Violation(
            "activations_per_tensor",
            f"activation '{data.name}' is quantized per channel ({count} scales); "
            f"{target.name} quantizes activations per tensor",
            node.name,
        )


def per_channel_weight_axes(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """A per-channel DequantizeLinear dequantizes a constant weight that a Conv, ConvTranspose,
    MatMul or Gemm reads, along that op's output-channel axis, with one scale per channel."""
    for node in _qdq_nodes(model):
        weight = _constant_source(_input(node, 0))
        count = _scale_count(node)
        if node.op_type != "DequantizeLinear" or weight is None or count in (None, 1):
            continue
        if _quantized_dtype(node) != ir.DataType.INT8 or "block_size" in node.attributes:
            continue  # an int32 bias or 4-bit blocks: qdq_types_int8 reports them
        yield from _per_channel_uses(node, _constant_shape(_input(node, 0)), count, target)


def weighted_op_outputs_unquantized(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """The output of a weighted op (after its bias) is not quantized, unless every reader of
    the quantized tensor is a weighted op, which needs its inputs quantized."""
    for node in all_nodes(model.graph):
        data = _input(node, 0)
        if node.op_type != "QuantizeLinear" or data is None:
            continue
        source = weighted_producer(data)
        if source is None:
            continue
        for reader in _dequantized_readers(node):
            yield Violation(
                "weighted_op_outputs_unquantized",
                f"'{data.name}', the output of {source.op_type} '{source.name}', is quantized "
                f"for {reader}; {target.name} keeps a weighted op's output in float unless "
                "another weighted op reads it (a Q/DQ there splits the op from what follows)",
                node.name,
            )


def residual_inputs_quantized(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """In an Add of an int8 weighted op's output and another activation (a skip connection),
    the other input comes through DequantizeLinear, so the op, the Add and an int8 output fuse."""
    for node in all_nodes(model.graph):
        skip, source = _residual_inputs(node)
        if skip is None or not _runs_int8(source) or _dequantized(skip):
            continue
        if KEEP_FLOAT_KEY in node.metadata_props:  # calibration could not quantize the skip
            continue
        yield Violation(
            "residual_inputs_quantized",
            f"the skip input '{skip.name}' of this residual Add is float while "
            f"{source.op_type} '{source.name}' (int8) feeds the other; {target.name} fuses the "
            "op and the Add into an int8 kernel only when the skip input is quantized",
            node.name,
        )


TENSORRT_RULES = (
    no_qoperator_ops,
    qdq_types_int8,
    zero_points_zero,
    scales_positive,
    activations_per_tensor,
    per_channel_weight_axes,
    weighted_op_outputs_unquantized,
    residual_inputs_quantized,
)
"""The TensorRT target's own rules, applied after the shared loadability rules."""


def _qdq_nodes(model: ir.Model) -> Iterator[ir.Node]:
    return (node for node in all_nodes(model.graph) if node.op_type in QDQ_OPS)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _data_name(node: ir.Node) -> str:
    data = _input(node, 0)
    return data.name if data is not None else "?"


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor.numpy() if tensor is not None else None


def _constant_source(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant ``value`` is, or quantizes or casts; None when it is computed at run time."""
    found = _constant_chain(value)
    return found[0] if found is not None else None


def _constant_shape(value: ir.Value) -> list[int]:
    """The shape of the constant ``value`` is (``_constant_source``'s), permuted by each
    ``Transpose`` on the way to it."""
    tensor, producers = _constant_chain(value)
    shape = list(tensor.shape)
    for node in reversed(producers):
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None) or reversed(range(len(shape)))
            shape = [shape[axis] for axis in perm]
    return shape


def _constant_chain(
    value: ir.Value | None,
) -> tuple[ir.TensorProtocol, list[ir.Node]] | None:
    """The constant ``value`` comes from and the ``PASS_THROUGH_OPS`` on the way, nearest
    first; None when ``value`` is computed at run time."""
    producers = []
    while value is not None:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            return tensor, producers
        producer = value.producer()
        if producer is None or producer.op_type not in PASS_THROUGH_OPS:
            return None
        producers.append(producer)
        value = _input(producer, 0)
    return None


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    tensor = ir.convenience.get_const_tensor(value)
    return tensor.dtype if tensor is not None else None


def _quantized_dtype(node: ir.Node) -> ir.DataType | None:
    """The integer type a Q/DQ node works in, as ONNX defines it."""
    zero_point = _input(node, 2)
    if zero_point is not None:
        return _dtype(zero_point)
    if node.op_type == "DequantizeLinear":
        data = _input(node, 0)
        return _dtype(data) if data is not None else None
    output_dtype = node.attributes.get_int("output_dtype", 0)
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8


def _scale_count(node: ir.Node) -> int | None:
    """How many scales a Q/DQ node has, where that is known."""
    scale = _input(node, 1)
    if scale is None:
        return None
    values = _constant_array(scale)
    if values is not None:
        return values.size
    if scale.shape is None or not scale.shape.is_static():
        return None
    return int(np.prod(scale.shape.numpy()))


def _shown(values: np.ndarray) -> str:
    unique = np.unique(values.ravel())
    shown = ", ".join(f"{v:g}" for v in unique[:MAX_VALUES_SHOWN])
    return shown + (", ..." if unique.size > MAX_VALUES_SHOWN else "")


def _output_channel_axis(reader: ir.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of ``reader``'s weight, if input ``index`` is that weight."""
    if reader.domain not in ONNX_DOMAINS or index != 1:
        return None
    if reader.op_type == "Conv":
        return 0
    if reader.op_type == "ConvTranspose":
        return 1
    if reader.op_type == "MatMul":
        return rank - 1
    if reader.op_type == "Gemm":
        return 0 if reader.attributes.get_int("transB", 0) else 1
    return None


def _per_channel_uses(
    node: ir.Node, shape: list[int], count: int, target: TargetSpec
) -> Iterator[Violation]:
    weight = _data_name(node)
    axis = node.attributes.get_int("axis", 1) % len(shape)
    for reader, index in node.outputs[0].uses():
        expected = _output_channel_axis(reader, index, len(shape))
        if expected is None:
            message = (
                f"'{weight}' is dequantized per channel for {reader.op_type} '{reader.name}' "
                f"(its input {index}), which is not a Conv/ConvTranspose/MatMul/Gemm weight; "
                f"{target.name} takes per-channel scales on those weights only"
            )
        elif axis != expected:
            message = (
                f"weight '{weight}' of {reader.op_type} '{reader.name}' is quantized along axis "
                f"{axis}; {target.name} wants its output-channel axis {expected}"
            )
        elif count != shape[axis]:
            message = (
                f"weight '{weight}' has {count} scales for its {shape[axis]} output channels "
                f"(axis {axis})"
            )
        else:
            continue
        yield Violation("per_channel_weight_axes", message, node.name)


def _dequantized_readers(quantize: ir.Node) -> Iterator[str]:
    """What reads a QuantizeLinear's output (through its DequantizeLinears) and is not a
    weighted op reading it as an activation, described for a message."""
    for dequantize, _ in quantize.outputs[0].uses():
        if dequantize.op_type != "DequantizeLinear":
            yield f"{dequantize.op_type} '{dequantize.name}'"
            continue
        if dequantize.outputs[0].is_graph_output():
            yield f"graph output '{dequantize.outputs[0].name}'"
        for reader, index in dequantize.outputs[0].uses():
            if reader.op_type not in WEIGHTED_OPS or index > 1:
                yield f"{reader.op_type} '{reader.name}'"


def _residual_inputs(node: ir.Node) -> tuple[ir.Value | None, ir.Node | None]:
    """For an Add of two activations of which exactly one is a weighted op's output: the
    other input (the skip connection) and that op; (None, None) for any other node."""
    if node.op_type != "Add" or node.domain not in ONNX_DOMAINS or len(node.inputs) != 2:
        return None, None
    if any(v is None or _constant_source(v) is not None for v in node.inputs):
        return None, None
    sources = [weighted_producer(v) for v in node.inputs]
    if (sources[0] is None) == (sources[1] is None):
        return None, None
    weighted = 0 if sources[0] is not None else 1
    return node.inputs[1 - weighted], sources[weighted]


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _runs_int8(node: ir.Node | None) -> bool:
    """Whether a weighted op reads both its activation and its weight through DQ."""
    return node is not None and all(_dequantized(_input(node, i)) for i in (0, 1))
