"""Measured int8 gains: what quantizing one op saves on this host, timed in onnxruntime.

For each candidate op of the accuracy plan, a one-op float model and its 8-bit twin, written
as qgraph writes it (the activations through QuantizeLinear / DequantizeLinear, the weight
dequantized per output channel in the target's weight type, a Q/DQ pair on the output of the
ops the target fuses only behind one), run in onnxruntime with every optimization at one
intra-op thread, the two alternating run by run (``qgraph.stopwatch``), at the op's own shapes.
The gain is ``t_float - t_int8``: negative where int8 is slower (small Convs, whose quantize,
requantize and layout work outweighs the product).

Timings are cached in ``<QGRAPH_CACHE>/timings.json`` by the op's shapes and attributes, the
types, the onnxruntime version and the CPU's flags; an entry that does not parse as two
positive numbers is measured again.

Without measuring (``--no-measure``), ``CostModel`` estimates the two times from the op's
``macs`` and the elements it quantizes, in fp32 multiply-accumulates (seconds at
``NOMINAL_FP32_MACS_PER_SECOND``):

    t_float = macs,    t_int8 = macs / r + Q (quantized inputs + quantized outputs)

with ``r`` the target's ``nominal_int8_speedup`` and ``Q = QUANTIZE_COST_MACS``; twice that for
a 16-bit activation, written as two 8-bit digits. A row lookup (``Gather``) from a table moves
its rows' elements, ``t_float = rows x columns``, and an 8-bit table dequantizes them too,
``t_int8 = t_float (1 + Q / 2)``. int8 then
pays where ``macs (1 - 1/r) > Q elements``: for a MatMul ``[M, K] x [K, N]`` whose input
alone is quantized, where ``N (1 - 1/r) > Q``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qgraph.models import cache_dir
from qgraph.passes.lowering import DigitLoweringPass
from qgraph.stopwatch import TimesFile, alternating_medians
from qgraph.targets import TargetSpec, host_cpu_flags

logger = logging.getLogger(__name__)

TIMED_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_ATTRIBUTES = (
    "strides",
    "pads",
    "dilations",
    "group",
    "kernel_shape",
    "auto_pad",
    "transA",
    "transB",
)


@dataclasses.dataclass(frozen=True)
class OpShape:
    """What the timing of one op depends on: its type, attributes and tensor shapes."""

    op_type: str
    inputs: tuple[tuple[int, ...], ...]
    """Shapes of the data inputs (the activation, and a computed second operand)."""
    weight: tuple[int, ...] | None
    """Shape of a constant weight, None for a product of two computed tensors."""
    attributes: tuple[tuple[str, str], ...]
    quantized_output: bool
    activation_bits: int = 8
    """16: the activation as two 8-bit digits (``passes/lowering/digits.py``), the weight in
    8 bits, no output Q."""

    def key(self, target: TargetSpec) -> str:
        fields = dataclasses.astuple(self)
        if self.activation_bits == 8:  # the keys timings had before 16-bit ones existed
            fields = fields[:-1]
        text = json.dumps(
            [
                fields,
                target.activations.dtype.name,
                target.weights.dtype.name,
                ort.__version__,
                sorted(host_cpu_flags()),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def op_shape(node: ir.Node, shapes: dict[str, tuple[int, ...]], target: TargetSpec) -> OpShape:
    """``node``'s ``OpShape`` from the shapes of a run (value name -> shape)."""
    weight = _weight_shape(node)
    data = node.inputs[:1] if weight is not None else node.inputs[:2]
    attributes = tuple(
        (name, _attribute_text(node.attributes[name].value))
        for name in _ATTRIBUTES
        if name in node.attributes
    )
    return OpShape(
        node.op_type,
        tuple(tuple(shapes[v.name]) for v in data),
        weight,
        attributes,
        target.kernels.quantizes_output(node),
    )


def _weight_shape(node: ir.Node) -> tuple[int, ...] | None:
    """The shape of the constant behind the op's dequantized weight (through a Transpose)."""
    value, transposes = node.inputs[1] if len(node.inputs) > 1 else None, 0
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in ("DequantizeLinear", "Transpose"):
            return None
        transposes += producer.op_type == "Transpose"
        value = producer.inputs[0]
    if value is None:
        return None
    shape = tuple(value.const_value.shape)
    return shape[::-1] if transposes % 2 else shape


class Timer(Protocol):
    """Gives (float, int8) seconds of one op: measured (``TimingCache``) or estimated."""

    measured: bool

    def seconds(self, shape: OpShape, target: TargetSpec) -> tuple[float, float]: ...


NOMINAL_FP32_MACS_PER_SECOND = 16e9
"""One thread of a Zen 1 EPYC (an fp32 MatMul of 2048 x 384 x 384 in 18 ms): only the unit
of the estimates, which the plan compares with each other."""
QUANTIZE_COST_MACS = 16.0
"""What quantizing one activation element costs, in fp32 multiply-accumulates of the same
thread: a QuantizeLinear + DequantizeLinear pair ran at 1.6 ns per element, an fp32 MatMul
at 0.06 ns per multiply-accumulate (Zen 1 EPYC, one thread, 2026-12-06)."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """``--no-measure``: times estimated from multiply-accumulates (module docstring)."""

    measured = False

    def seconds(self, shape: OpShape, target: TargetSpec) -> tuple[float, float]:
        if shape.op_type == "Gather":  # rows moved; 8-bit ones dequantized, half a Q/DQ pair
            moved = float(math.prod(shape.inputs[0]) * shape.weight[1])
            int8 = moved * (1 + QUANTIZE_COST_MACS / 2)
            return moved / NOMINAL_FP32_MACS_PER_SECOND, int8 / NOMINAL_FP32_MACS_PER_SECOND
        work = float(macs(shape))
        quantized = sum(math.prod(dims) for dims in shape.inputs)
        if shape.quantized_output:
            quantized += work / _reduction(shape)
        int8 = work / target.kernels.nominal_int8_speedup + QUANTIZE_COST_MACS * quantized
        int8 *= shape.activation_bits // 8  # a 16-bit activation: two 8-bit digit products
        return work / NOMINAL_FP32_MACS_PER_SECOND, int8 / NOMINAL_FP32_MACS_PER_SECOND


def macs(shape: OpShape) -> int:
    """Multiply-accumulates of one run of the op: output elements x the reduction length."""
    return _output_elements(shape) * _reduction(shape)


def _reduction(shape: OpShape) -> int:
    """How many products each output element sums."""
    if shape.op_type == "Conv":
        return math.prod((shape.weight or (1, 1))[1:])
    first = shape.inputs[0]
    return first[0] if _attributes(shape).get("transA") else first[-1]


def _attributes(shape: OpShape) -> dict[str, object]:
    return {name: _attribute(text) for name, text in shape.attributes}


def _output_elements(shape: OpShape) -> int:
    first = shape.inputs[0]
    attributes = _attributes(shape)
    if shape.op_type == "Conv":
        channels = (shape.weight or (1,))[0]
        return first[0] * channels * math.prod(_conv_sizes(first[2:], shape.weight, attributes))
    second = shape.weight or shape.inputs[1]
    columns = second[-2] if attributes.get("transB") else second[-1]
    rows = first[1] if attributes.get("transA") else math.prod(first[:-1])
    return rows * columns


def _conv_sizes(
    sizes: tuple[int, ...], weight: tuple[int, ...] | None, attributes: dict[str, object]
) -> list[int]:
    """Each spatial output size: ``(in + pads - dilation (kernel - 1) - 1) // stride + 1``."""
    kernel = attributes.get("kernel_shape") or list((weight or ())[2:]) or [1] * len(sizes)
    count = len(sizes)
    strides = attributes.get("strides") or [1] * count
    if attributes.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        return [-(-size // stride) for size, stride in zip(sizes, strides, strict=True)]
    pads = attributes.get("pads") or [0] * 2 * count
    dilations = attributes.get("dilations") or [1] * count
    return [
        (size + pads[i] + pads[i + count] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i, size in enumerate(sizes)
    ]


class TimingCache:
    """Measured (float, int8) seconds per op shape, kept in a JSON file."""

    measured = True

    def __init__(self, path: Path) -> None:
        self.file = TimesFile(path, count=2)

    def seconds(self, shape: OpShape, target: TargetSpec) -> tuple[float, float]:
        float_seconds, int8_seconds = self.file.seconds(
            shape.key(target), lambda: list(measure(shape, target))
        )
        return float_seconds, int8_seconds


def measure(shape: OpShape, target: TargetSpec) -> tuple[float, float]:
    """Median seconds of the op in float and in 8 bits, alternating run by run."""
    rng = np.random.default_rng(0)
    float_model, int8_model, feeds = _twins(shape, target, rng)
    float_seconds, int8_seconds = alternating_medians([float_model, int8_model], feeds)
    return float_seconds, int8_seconds


def _twins(shape: OpShape, target: TargetSpec, rng: np.random.Generator):
    """(float model, quantized model, feeds) of one op at ``shape``: 8-bit, or with a 16-bit
    activation lowered to digits as the compile would."""
    if shape.op_type == "Gather":
        return _lookup_twins(shape, rng)
    names = [f"x{i}" for i in range(len(shape.inputs))]
    feeds = {
        name: rng.standard_normal(dims).astype(np.float32)
        for name, dims in zip(names, shape.inputs, strict=True)
    }
    attributes = {name: _attribute(value) for name, value in shape.attributes}
    weight = None if shape.weight is None else rng.standard_normal(shape.weight)
    operands = list(names)
    float_initializers = []
    if weight is not None:
        operands.append("W")
        float_initializers.append(numpy_helper.from_array(weight.astype(np.float32), "W"))
    float_nodes = [helper.make_node(shape.op_type, operands, ["y"], **attributes)]
    int8_nodes, int8_initializers = _quantized_inputs(names, target, shape.activation_bits)
    operands = [f"{name}_dq" for name in names]
    if weight is not None:
        operands.append("W_dq")
        int8_nodes.append(_weight_dequantizer(shape, weight, target, int8_initializers))
    output = "y_float" if shape.quantized_output else "y"
    int8_nodes.append(helper.make_node(shape.op_type, operands, [output], **attributes))
    if shape.quantized_output:
        int8_nodes += [
            helper.make_node("QuantizeLinear", ["y_float", "s", "z"], ["y_q"]),
            helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"]),
        ]
    quantized = _model(int8_nodes, int8_initializers, names, shape)
    if shape.activation_bits == 16:
        quantized = _digits_lowered(quantized, target)
    return _model(float_nodes, float_initializers, names, shape), quantized, feeds


def _lookup_twins(shape: OpShape, rng: np.random.Generator):
    """A row lookup from a float table, and from an 8-bit one as insert-qdq writes it: the
    int8 rows and their scales gathered, the rows cast to float and scaled."""
    rows, columns = shape.weight
    table = rng.standard_normal((rows, columns)).astype(np.float32)
    feeds = {"x0": rng.integers(0, rows, shape.inputs[0]).astype(np.int64)}
    float_nodes = [helper.make_node("Gather", ["T", "x0"], ["y"], axis=0)]
    int8_nodes = [
        helper.make_node("Gather", ["T_q", "x0"], ["rows"], axis=0),
        helper.make_node("Gather", ["T_s", "x0"], ["scales"], axis=0),
        helper.make_node("Cast", ["rows"], ["rows_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rows_float", "scales"], ["y"]),
    ]
    scales = np.abs(table).max(axis=1, keepdims=True) / 127
    int8_initializers = [
        numpy_helper.from_array(np.rint(table / scales).astype(np.int8), "T_q"),
        numpy_helper.from_array(scales.astype(np.float32), "T_s"),
    ]
    float_initializers = [numpy_helper.from_array(table, "T")]
    ids = [helper.make_tensor_value_info("x0", TensorProto.INT64, shape.inputs[0])]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    models = [
        helper.make_graph(nodes, "op", ids, output, initializers)
        for nodes, initializers in (
            (float_nodes, float_initializers),
            (int8_nodes, int8_initializers),
        )
    ]
    opsets = [helper.make_opsetid("", 17)]
    return (*(helper.make_model(g, opset_imports=opsets, ir_version=8) for g in models), feeds)


def _digits_lowered(model: onnx.ModelProto, target: TargetSpec) -> onnx.ModelProto:
    """``model``'s 16-bit activation written as 8-bit digit products, as the compile does."""
    lowered = ir.from_proto(model)
    DigitLoweringPass(target)(lowered)
    return ir.to_proto(lowered)


ACTIVATION_TYPES = {
    (8, True): np.int8,
    (8, False): np.uint8,
    (16, True): np.int16,
    (16, False): np.uint16,
}
"""(bits, signed) -> the activation's numpy type in a quantized twin."""


def _quantized_inputs(names: list[str], target: TargetSpec, bits: int = 8):
    signed = target.activations.dtype.is_signed()
    zero = 0 if signed else 2 ** (bits - 1)
    dtype = ACTIVATION_TYPES[bits, signed]
    initializers = [
        numpy_helper.from_array(np.array(0.02 / 2 ** (bits - 8), np.float32), "s"),
        numpy_helper.from_array(np.array(zero, dtype), "z"),
    ]
    nodes = []
    for name in names:
        nodes.append(helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"]))
    return nodes, initializers


def _weight_dequantizer(shape, weight, target, initializers):
    axis = 0 if shape.op_type == "Conv" or dict(shape.attributes).get("transB") == "1" else 1
    signed = target.weights.dtype.is_signed()
    values = np.clip(np.rint(weight * 40), -127, 127) + (0 if signed else 128)
    dtype = np.int8 if signed else np.uint8
    channels = weight.shape[axis]
    initializers += [
        numpy_helper.from_array(values.astype(dtype), "W_q"),
        numpy_helper.from_array(np.full(channels, 0.025, np.float32), "W_s"),
        numpy_helper.from_array(np.full(channels, 0 if signed else 128, dtype), "W_z"),
    ]
    return helper.make_node("DequantizeLinear", ["W_q", "W_s", "W_z"], ["W_dq"], axis=axis)


def _model(nodes, initializers, names, shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "op",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
            for name, dims in zip(names, shape.inputs, strict=True)
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    opset, ir_version = (21, 10) if shape.activation_bits == 16 else (17, 8)  # 16-bit Q/DQ
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _attribute_text(value: object) -> str:
    """An attribute value (an int, ints or a string) as JSON text, for keys and back."""
    return json.dumps(list(value) if isinstance(value, (list, tuple)) else value)


def _attribute(text: str) -> object:
    return json.loads(text)


def default_cache() -> TimingCache:
    """The cache under the zoo's cache folder (``$QGRAPH_CACHE``)."""
    return TimingCache(cache_dir() / "timings.json")
