"""magika's Conv as one 8-bit product plus its outliers in float: a prototype, timed.

    python benchmarks/outlier_split.py [--runs 15] [--out benchmarks/outlier_split.md]

magika's Conv input has a few positions far outside the rest (``magika_precision.md``): 8 bits
over the whole range cost 61 of 2176 samples, 8 bits over a clipped range 128, so the default
compile keeps the Conv float or gives it two 8-bit digits (``passes/lowering/digits.py``),
two products. Without AMX, two products are slower than float and magika runs 1.7x FP32.

The Conv is linear in its input ``x``. With ``c(x) = clip(x, lo, hi)``, the range of a u8
Q/DQ of scale ``s`` and zero point ``z`` (``lo = -s z``, ``hi = s (255 - z)``):

    conv(x, w) = conv(c(x), w) + conv(x - c(x), w)

The first term is one u8 x s8 product over im2col rows (``MatMulIntegerToFloat``: exact in
int32, float out, so the Conv's output needs no Q/DQ, which alone costs magika 80 samples).
The second is zero but at the positions with a channel outside ``[lo, hi]``: with ``[lo, hi]``
the calibration's 0.1th and 99.9th percentiles, 4.2% of magika's positions. Such a position
``p``, whose channels leave ``r_p = x_p - c(x_p)``, adds ``r_p W_t`` to output position
``p - t`` for each tap ``t``: one float ``[P, C] x [C, K O]`` product over those positions and
a scatter-add (``ScatterND``, reduction add) into the ``[N, L', O]`` sum. That sum stays
channels-last: the Conv's readers in magika are a max and a min over positions, which read
it there, and no transpose back to NCHW is paid.

What it compares, each against FP32 on the held-out set (``qgraph.evaluation.evaluate``: top-1
agreement, then latency at one thread, interleaved medians): the default compile, the compile
with the Conv excluded (``--exclude-op Conv``), and that compile with the Conv split as above.
Not a qgraph pass yet: the weights are rounded here (symmetric, per output channel, as qgraph
does) and the graph is edited for magika's shape (a [K, 1] kernel, stride 1, no padding).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from magika_precision import tensor_values
from onnx import helper, numpy_helper

from qgraph import models
from qgraph.cli import cli
from qgraph.data import read_batches
from qgraph.evaluation import evaluate
from qgraph.quant.spec import QuantSpec, quantize_weight

PERCENTILE = 99.9
WEIGHT_SPEC = QuantSpec(ir.DataType.INT8, symmetric=True, axis=0)
SCATTER_OPSET = 16
"""``ScatterND``'s ``reduction`` attribute came with opset 16."""


class Edit:
    """Nodes and constants added to a model, every name prefixed."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "split_") -> None:
        self.model = model
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def constant(self, name: str, value: np.ndarray | float | int) -> str:
        full = f"{self.prefix}{name}_constant"
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        domain = "com.microsoft" if op == "MatMulIntegerToFloat" else ""
        full = output if output.startswith(self.prefix) else self.prefix + output
        self.nodes.append(helper.make_node(op, inputs, [full], domain=domain, **attributes))
        return full


def channels_last_source(model: onnx.ModelProto, conv: onnx.NodeProto) -> str:
    """The [N, L, C] tensor the exporter unsqueezed and transposed into the Conv's input."""
    producers = {output: node for node in model.graph.node for output in node.output}
    transpose = producers[conv.input[0]]
    unsqueeze = producers.get(transpose.input[0]) if transpose.op_type == "Transpose" else None
    perm = [helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"]
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or perm != [[0, 2, 1, 3]]:
        raise SystemExit("outlier_split.py: the Conv's input is not magika's Unsqueeze + Transpose")
    return unsqueeze.input[0]


def int8_weight(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The [O, C, K, 1] float weight as qgraph quantizes it: int8, symmetric, one scale per
    output channel."""
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
    quantized = quantize_weight(weight, WEIGHT_SPEC)
    return quantized.values, quantized.scale


def input_range(model: onnx.ModelProto, source: str, calibration: Path) -> tuple[float, float]:
    """The ``PERCENTILE`` range of ``source`` over the calibration set, zero inside it."""
    values = tensor_values(model, source, list(read_batches(calibration)))
    low, high = np.percentile(values, [100 - PERCENTILE, PERCENTILE])
    return min(float(low), 0.0), max(float(high), 0.0)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """magika's Conv: ``x`` [N, L, C] channels-last, weight [O, C, K, 1], output [N, O, L', 1]."""

    outputs: int
    channels: int
    taps: int
    length: int

    @property
    def out_length(self) -> int:
        return self.length - self.taps + 1


def split_conv(model: onnx.ModelProto, low: float, high: float) -> onnx.ModelProto:
    """``model`` with its Conv as ``conv(c(x)) + conv(x - c(x))`` (module docstring)."""
    split = onnx.ModelProto()
    split.CopyFrom(model)
    conv = next(node for node in split.graph.node if node.op_type == "Conv")
    x = channels_last_source(split, conv)
    weight, weight_scale = int8_weight(split, conv.input[1])
    length = _static_dims(onnx.shape_inference.infer_shapes(split), x)[1]
    shape = ConvShape(*weight.shape[:3], length=int(length))
    edit = Edit(split)
    scale = np.float32((high - low) / 255)
    zero_point = np.uint8(round(-low / scale))
    quantizer = (edit.constant("scale", scale), edit.constant("zero_point", zero_point))
    bounds = (scale * (0 - int(zero_point)), scale * (255 - int(zero_point)))
    clipped_sum = _clipped_product(edit, x, quantizer, weight, weight_scale, shape)
    float_weight = weight[..., 0] * weight_scale[:, None, None]
    summed = _rest_added(edit, x, bounds, float_weight, clipped_sum, shape)
    _read_channels_last(split, conv, summed, edit)
    _replace(split, conv, edit.nodes)
    _drop_unread(split)
    return onnx.shape_inference.infer_shapes(split, strict_mode=True)


def _clipped_product(edit: Edit, x: str, quantizer, weight, weight_scale, shape: ConvShape) -> str:
    """``conv(c(x))``, [N, L', O]: im2col rows ``(t, c)`` of the u8 input, one u8 x s8 product."""
    taps = np.arange(shape.out_length)[:, None] + np.arange(shape.taps)[None, :]
    quantized = edit.node("QuantizeLinear", [x, *quantizer], "quantized")
    gathered = edit.node("Gather", [quantized, edit.constant("taps", taps)], "im2col", axis=1)
    width = edit.constant("row_width", np.array([-1, shape.taps * shape.channels]))
    rows = edit.node("Reshape", [gathered, width], "rows")
    matrix = weight[..., 0].transpose(2, 1, 0).reshape(shape.taps * shape.channels, shape.outputs)
    weights = (edit.constant("weight", matrix), edit.constant("weight_scale", weight_scale))
    operands = [rows, weights[0], quantizer[0], weights[1], quantizer[1]]
    product = edit.node("MatMulIntegerToFloat", operands, "product")
    channels_last = edit.constant("sum_shape", np.array([-1, shape.out_length, shape.outputs]))
    return edit.node("Reshape", [product, channels_last], "clipped_sum")


def _rest_added(edit: Edit, x: str, bounds, float_weight, clipped_sum: str, shape: ConvShape):
    """``clipped_sum + conv(x - c(x))``: each position outside ``bounds`` adds its rest times
    each tap's weight to the output position it reaches (module docstring)."""
    low, high = (
        edit.constant("low", np.float32(bounds[0])),
        edit.constant("high", np.float32(bounds[1])),
    )
    row_max = edit.node("ReduceMax", [x], "row_max", axes=[2], keepdims=0)
    row_min = edit.node("ReduceMin", [x], "row_min", axes=[2], keepdims=0)
    above = edit.node("Greater", [row_max, high], "above")
    outside = edit.node("Or", [above, edit.node("Less", [row_min, low], "below")], "outside")
    found = edit.node("NonZero", [outside], "found")
    where = edit.node("Transpose", [found], "where", perm=[1, 0])  # [P, 2]: (n, p)
    picked = edit.node("GatherND", [x, where], "picked")
    rest = edit.node("Sub", [picked, edit.node("Clip", [picked, low, high], "clipped")], "rest")
    matrix = float_weight.transpose(1, 2, 0).reshape(shape.channels, shape.taps * shape.outputs)
    product = edit.node("MatMul", [rest, edit.constant("float_weight", matrix)], "rest_product")
    per_tap = edit.constant("per_tap", np.array([-1, shape.taps, shape.outputs]))
    updates = edit.node("Reshape", [product, per_tap], "updates")  # [P, K, O]
    indices, inside = _reached(edit, where, shape)
    kept = edit.node("Where", [inside, updates, edit.constant("zero", np.float32(0))], "kept")
    pairs = edit.node("Reshape", [indices, edit.constant("pairs", np.array([-1, 2]))], "pairs")
    slices = edit.constant("slices", np.array([-1, shape.outputs]))
    slices = edit.node("Reshape", [kept, slices], "slices")
    return edit.node("ScatterND", [clipped_sum, pairs, slices], "sum", reduction="add")


def _reached(edit: Edit, where: str, shape: ConvShape) -> tuple[str, str]:
    """The output position ``(n, p - t)`` each found position ``(n, p)`` reaches through tap
    ``t``, [P, K, 2], clamped into the output, and whether it was inside, [P, K, 1]."""
    shifts = np.zeros((1, shape.taps, 2), np.int64)
    shifts[0, :, 1] = np.arange(shape.taps)
    each_tap = edit.node("Unsqueeze", [where, edit.constant("tap_axis", np.array([1]))], "each")
    reached = edit.node("Sub", [each_tap, edit.constant("shifts", shifts)], "reached")
    position_of = (edit.constant(name, np.array([v])) for name, v in (("one", 1), ("two", 2)))
    position = edit.node(
        "Slice", [reached, *position_of, edit.constant("last", np.array([2]))], "p"
    )
    from_start = edit.node("GreaterOrEqual", [position, edit.constant("start", np.int64(0))], "ge")
    end = edit.constant("end", np.int64(shape.out_length))
    inside = edit.node("And", [from_start, edit.node("Less", [position, end], "lt")], "inside")
    floor = edit.constant("floor", np.zeros((1, 1, 2), np.int64))
    ceiling = np.array([[[np.iinfo(np.int64).max, shape.out_length - 1]]])
    floored = edit.node("Max", [reached, floor], "floored")
    return edit.node("Min", [floored, edit.constant("ceiling", ceiling)], "clamped"), inside


def _read_channels_last(model: onnx.ModelProto, conv, summed: str, edit: Edit) -> None:
    """The Conv's readers, a Squeeze then max and min over positions, read the [N, L', O] sum
    over axis 1 instead, their [N, 1, O] transposed to the [N, O, 1] they gave."""
    readers = [node for node in model.graph.node if conv.output[0] in node.input]
    if len(readers) != 1 or readers[0].op_type != "Squeeze":
        raise SystemExit("outlier_split.py: the Conv's output is not magika's Squeeze")
    squeeze = readers[0]
    for node in list(model.graph.node):
        if squeeze.output[0] not in node.input:
            continue
        if node.op_type not in ("ReduceMax", "ReduceMin"):
            raise SystemExit(f"outlier_split.py: the Conv's output reaches a {node.op_type}")
        result = node.output[0]
        node.input[0], node.output[0] = summed, result + "_channels_last"
        del node.attribute[:]
        node.attribute.extend(
            [helper.make_attribute("axes", [1]), helper.make_attribute("keepdims", 1)]
        )
        transposed = helper.make_node("Transpose", [node.output[0]], [result], perm=[0, 2, 1])
        model.graph.node.insert(list(model.graph.node).index(node) + 1, transposed)
    model.graph.node.remove(squeeze)


def _replace(model: onnx.ModelProto, conv, nodes: list[onnx.NodeProto]) -> None:
    """``nodes`` where ``conv`` was; ``ScatterND``'s reduction needs opset 16, and
    ``MatMulIntegerToFloat`` onnxruntime's domain."""
    position = list(model.graph.node).index(conv)
    model.graph.node.remove(conv)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, SCATTER_OPSET)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove the nodes nothing reads (the transpose into the Conv): onnxruntime keeps them."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {output.name for output in graph.output}
        unread = [node for node in graph.node if not any(o in read for o in node.output)]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)


def exact_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each activation's ``DQ(Q(x))`` read as ``x``: the classifier's input,
    which the default compile gives 16 bits (two 8-bit digits, as good as exact here)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    exact = {}
    for node in model.graph.node:
        quantize = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            exact[node.output[0]] = quantize.input[0]
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = exact.get(name, name)
    return model


def _static_dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    infos = [*model.graph.input, *model.graph.value_info]
    info = next(v for v in infos if v.name == name)
    return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]


def compile_magika(zoo: models.ZooModel, output: Path, flags: list[str]) -> Path:
    """``qgraph compile`` of magika with ``flags``, through the command line's entry point."""
    arguments = [str(zoo.model), "--calib", str(zoo.calibration), "-o", str(output), *flags]
    cli.main(["compile", *arguments], prog_name="qgraph", standalone_mode=False)
    return output


def report(runs: int) -> list[str]:
    zoo = models.fetch("magika")
    lines = [
        "| variant | top-1 agreement | one thread |",
        "|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="outlier-split-") as scratch:
        folder = Path(scratch)
        default = compile_magika(zoo, folder / "default.onnx", [])
        float_conv = compile_magika(zoo, folder / "float-conv.onnx", ["--exclude-op", "Conv"])
        excluded = exact_activations(onnx.load(float_conv))
        source = channels_last_source(
            excluded, next(n for n in excluded.graph.node if n.op_type == "Conv")
        )
        low, high = input_range(excluded, source, zoo.calibration)
        split = folder / "split.onnx"
        onnx.save(split_conv(excluded, low, high), split)
        variants = {
            "qgraph default": default,
            "qgraph, the Conv excluded": float_conv,
            f"the same, its activations exact, the Conv split at [{low:.2f}, {high:.2f}]": split,
        }
        for name, path in variants.items():
            result = evaluate(zoo.model, path, zoo.evaluation, runs=runs)
            latency = result.latency
            lines.append(
                f"| {name} | {result.figures['top1_agreement']:.2%} | "
                f"{latency.speedup:.2f}x ({latency.candidate * 1e3:.1f} ms against "
                f"{latency.reference * 1e3:.1f}) |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="Timed runs of each model.")
    parser.add_argument("--out", type=Path, help="Write the Markdown table here too.")
    args = parser.parse_args()
    text = "\n".join(report(args.runs)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
