"""Runtime check: every quantized op runs as an integer kernel, or goes back to float.

onnxruntime runs a Q/DQ group as an integer kernel only where its QDQ transformers match it
(``qgraph.kernels``); an unmatched group runs its op in float and dequantizes the weight on
every run, slower than the float model. After quantization (and lowering) this pass loads the
model in onnxruntime with every optimization on, reads the graph it will run, and puts each op
that would run that way back in float: its weight and bias are the float tensors they were
before quantization, and its activation inputs read the float tensors their Q/DQ pairs
quantized (pairs no one reads any more go at ``remove-unused``). Float in, float out, so the
model keeps the float function of those ops exactly.

Putting an op back can change how the runtime fuses its neighbours: the Q that read a
producer's output may go with it, and the producer then fuses differently (a ``Gemm`` whose
Relu no Q reads any more becomes a float ``FusedGemm``). So after each round the Q/DQ pairs
no one reads are removed and the runtime is asked again, until it runs every remaining
quantized op as an integer kernel; each round puts at least one more op back, so this ends.

It runs only where the runtime it asks is the target's: a CPU target (``runtime_checked``) of
this host's architecture. Elsewhere its report says why it did not check.

Before asking, on any target, it refuses (``ConformanceError``, naming the node and the scale)
a ``DequantizeLinear`` whose scale does not fit its input ``x`` as ONNX defines it: a scalar
(per tensor, no ``block_size``); a vector of ``x.shape[axis]`` (per axis, no ``block_size``); or
``x``'s rank with ``ceil(x.shape[axis] / block_size)`` on ``axis`` and ``x``'s size elsewhere
(per block). A zero point has the scale's shape. onnxruntime may load such a node and fail, or
fold it into garbage, only when it runs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import platform

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qgraph.errors import ConformanceError
from qgraph.kernels import FloatOp, KernelReport, runtime_kernels
from qgraph.passes.qdq.build import FLOAT_SOURCE_KEY
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.spec import dequantize
from qgraph.sections import QuantizationOutcome, counted
from qgraph.targets import TargetSpec, same_arch

logger = logging.getLogger(__name__)

QUANTIZE_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})


@dataclasses.dataclass(frozen=True)
class RuntimeCheckReport:
    """What the runtime said, and which ops went back to float; or why nothing was asked."""

    kernels: KernelReport | None
    reverted: tuple[FloatOp, ...] = ()
    skipped: str | None = None

    def outcome(self) -> QuantizationOutcome:
        """The ops put back in float, each with why."""
        return QuantizationOutcome(
            reverted=collections.Counter(op.op_type for op in self.reverted),
            left_in_float={op.name: (op.op_type, op.reason) for op in self.reverted},
        )

    def summary(self) -> str:
        if self.kernels is None:
            return f"integer kernels not checked: {self.skipped}"
        quantized = self.kernels.quantized - len(self.reverted)
        if not quantized and self.reverted:
            return (
                f"none of the {len(self.reverted)} quantized ops would run as an integer kernel "
                "in onnxruntime (each would dequantize its weights on every run): all stay float"
            )
        line = f"{quantized} of {quantized} quantized ops run as integer kernels (onnxruntime)"
        if self.reverted:
            line += (
                f"; {len(self.reverted)} more would have run in float with weights dequantized "
                "on every run, so they stay float"
            )
        return line


class RuntimeCheckPass(ir.passes.InPlacePass):
    """Ask onnxruntime which quantized ops run as integer kernels; put the others in float."""

    def __init__(self, target: TargetSpec) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ReportingPassResult:
        for node in model.graph:
            problem = dequantize_shape_problem(node) if node.op_type == "DequantizeLinear" else None
            if problem is not None:
                raise ConformanceError(f"DequantizeLinear '{node.name}': {problem}")
        reason = self._not_checked()
        if reason is not None:
            return ReportingPassResult(model, False, RuntimeCheckReport(None, skipped=reason))
        first = kernels = runtime_kernels(model)
        reverted: list[FloatOp] = []
        four_bit: list[str] = []
        while new := [op for op in kernels.float_ops if op not in reverted]:
            by_name = {node.name: node for node in model.graph}
            for op in new:
                logger.info("'%s' (%s): %s; kept in float", op.name, op.op_type, op.reason)
                if _reads_four_bit_weight(by_name[op.name]):
                    four_bit.append(op.name)
                restore_float_inputs(by_name[op.name])
            reverted += new
            common.RemoveUnusedNodesPass()(model)
            kernels = runtime_kernels(model)
        if four_bit:
            logger.warning(
                "%s asked for 4-bit weights stay float (e.g. '%s'): onnxruntime's one 4-bit "
                "kernel, MatMulNBits, is a MatMul's with a float activation, which it "
                "quantizes itself at run time (--mode weight-only)",
                counted(len(four_bit), "op"),
                four_bit[0],
            )
        report = RuntimeCheckReport(first, tuple(reverted))
        return ReportingPassResult(model, bool(reverted), report)

    def _not_checked(self) -> str | None:
        if not self.target.kernels.runtime_checked:
            return f"target {self.target.name} runs on {self.target.execution_provider}"
        if not same_arch(self.target.arch, platform.machine()):
            return f"target {self.target.name} runs on {self.target.arch}, this host is not one"
        return None


def dequantize_shape_problem(node: ir.Node) -> str | None:
    """Why the scale (or zero point) of DequantizeLinear ``node`` does not fit its input as ONNX
    defines it; None when it fits, or when the shapes are not constants."""
    scale = _constant_shape(node.inputs[1])
    if scale is None:
        return None
    scale_name = node.inputs[1].name
    block = node.attributes.get_int("block_size", 0)
    if len(scale) > 1 and not block:
        return (
            f"scale '{scale_name}' has shape {list(scale)} but no block_size (a per-axis scale "
            "is a vector; a per-block one needs block_size)"
        )
    shape = _constant_shape(node.inputs[0])
    if shape is None:
        return None
    axis = node.attributes.get_int("axis", 1) % max(len(shape), 1)
    if block:
        expected = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    elif len(scale) == 1 and scale[0] != 1:  # a 1-element vector is per tensor, as a scalar
        expected = (shape[axis],)
    else:
        expected = scale
    if scale != expected:
        granularity = f"block_size {block} on axis {axis}" if block else f"axis {axis}"
        return (
            f"scale '{scale_name}' has shape {list(scale)}, but input {list(shape)} with "
            f"{granularity} needs {list(expected)}"
        )
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    zero_shape = _constant_shape(zero_point) if zero_point is not None else None
    if zero_shape is not None and zero_shape != scale:
        return f"zero point '{zero_point.name}' has shape {list(zero_shape)}, not {list(scale)}"
    return None


def _constant_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The shape of a constant, or of a constant's ``Transpose``; None for a computed tensor."""
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return None
    source = _constant_shape(producer.inputs[0])
    if source is None:
        return None
    perm = producer.attributes.get_ints("perm", list(range(len(source)))[::-1])
    return tuple(source[i] for i in perm)


def _reads_four_bit_weight(node: ir.Node) -> bool:
    """``node`` reads a dequantized 4-bit constant."""
    return any(
        value is not None
        and (producer := value.producer()) is not None
        and producer.op_type == "DequantizeLinear"
        and producer.inputs[0].dtype is not None
        and producer.inputs[0].dtype.bitwidth == 4
        for value in node.inputs
    )


def restore_float_inputs(node: ir.Node) -> None:
    """Make ``node`` read float tensors where it reads dequantized ones."""
    for index, value in enumerate(node.inputs):
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        node.replace_input_with(index, _float_source(producer))


def _float_source(dequantize_node: ir.Node) -> ir.Value:
    """The float tensor a DequantizeLinear's input was made from."""
    quantized = dequantize_node.inputs[0]
    source = quantized.producer()
    if source is not None and source.op_type in QUANTIZE_OPS:
        return source.inputs[0]
    graph = dequantize_node.graph
    original = dequantize_node.meta.get(FLOAT_SOURCE_KEY)
    if original is not None and (
        graph.initializers.get(original.name) is original or original.producer() is not None
    ):
        return original
    name = f"{dequantize_node.outputs[0].name}_float"
    if name in graph.initializers:
        return graph.initializers[name]
    tensor = original.const_value if original is not None else _dequantized_tensor(dequantize_node)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _dequantized_tensor(node: ir.Node) -> ir.Tensor:
    """The float value of a DequantizeLinear of constants (per tensor, axis or block)."""
    values, scale = node.inputs[0].const_value.numpy(), node.inputs[1].const_value.numpy()
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = zero.const_value.numpy() if zero is not None else np.zeros_like(scale)
    if scale.ndim == 1:
        shape = [1] * values.ndim
        shape[node.attributes.get_int("axis", 1)] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    elif scale.ndim > 1:
        axis, block = node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 1)
        length = values.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(range(length), axis=axis)
        zero_point = np.repeat(zero_point, block, axis=axis).take(range(length), axis=axis)
    return ir.Tensor(dequantize(values, scale, zero_point))


BUILDERS: dict[str, PassBuilder] = {
    "runtime-check": lambda ctx: (
        None if ctx.options.quantization is None else RuntimeCheckPass(ctx.target)
    ),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
