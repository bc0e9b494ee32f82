"""Lowering of elementwise, pooling and Softmax groups to onnxruntime's ``QLinear*`` ops.

Each group is built by hand with integer graph inputs behind DequantizeLinear and its
QuantizeLinear output as the graph output, so that random integers over the whole 8-bit range
reach the op and the two models' integer outputs can be compared directly: the QLinear op must
land within one step of the Q/DQ model's rounding (see ``qgraph.passes.lowering.elementwise``).
Both models run with onnxruntime's graph optimizations off, so the reference is the literal Q/DQ
arithmetic and not onnxruntime's own fusion into the same kernels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.passes.canonicalize import ShapeInferencePass
from qgraph.passes.lowering import LowerPass, compiled_rules
from qgraph.passes.rule_table import near_misses

TARGETS = ("x86-avx2", "arm64")
"""uint8 activations (x86, VNNI or not) and int8 (arm64)."""
OPSET = 21
IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class Group:
    """``Q(op(DQ(x1), DQ(x2), ...))``: the op, its inputs' shapes and scales, its output's
    shape and scale, and the op's attributes."""

    rule: str
    op_type: str
    qlinear: str
    inputs: dict[str, list[int]]
    output: list[int]
    scales: tuple[float, ...]
    output_scale: float
    attributes: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.op_type}{self.attributes or ''}"


SHAPE = [2, 3, 4, 5]
GROUPS = (
    Group("qlinear-add", "Add", "QLinearAdd", {"a": SHAPE, "b": SHAPE}, SHAPE, (0.05, 0.02), 0.07),
    Group(
        "qlinear-add",
        "Add",
        "QLinearAdd",
        {"a": SHAPE, "b": [1, 3, 1, 1]},
        SHAPE,
        (0.05, 0.1),
        0.1,
    ),
    Group("qlinear-mul", "Mul", "QLinearMul", {"a": SHAPE, "b": SHAPE}, SHAPE, (0.05, 0.02), 0.2),
    Group("qlinear-sigmoid", "Sigmoid", "QLinearSigmoid", {"x": SHAPE}, SHAPE, (0.05,), 1 / 256),
    Group(
        "qlinear-leaky-relu",
        "LeakyRelu",
        "QLinearLeakyRelu",
        {"x": SHAPE},
        SHAPE,
        (0.05,),
        0.04,
        {"alpha": 0.2},
    ),
    Group(
        "qlinear-concat",
        "Concat",
        "QLinearConcat",
        {"a": SHAPE, "b": [2, 1, 4, 5], "c": [2, 2, 4, 5]},
        [2, 6, 4, 5],
        (0.05, 0.02, 0.08),
        0.08,
        {"axis": 1},
    ),
    Group(
        "qlinear-global-average-pool",
        "GlobalAveragePool",
        "QLinearGlobalAveragePool",
        {"x": [2, 3, 5, 5]},
        [2, 3, 1, 1],
        (0.05,),
        0.01,
    ),
    Group(
        "qlinear-average-pool",
        "AveragePool",
        "QLinearAveragePool",
        {"x": [2, 3, 7, 7]},
        [2, 3, 4, 4],
        (0.05,),
        0.03,
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    Group(
        "qlinear-average-pool",
        "AveragePool",
        "QLinearAveragePool",
        {"x": [2, 3, 6, 6]},
        [2, 3, 3, 3],
        (0.05,),
        0.03,
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 0},
    ),
    Group("qlinear-softmax", "Softmax", "QLinearSoftmax", {"x": SHAPE}, SHAPE, (0.05,), 1 / 255),
    Group(
        "qlinear-softmax",
        "Softmax",
        "QLinearSoftmax",
        {"x": SHAPE},
        SHAPE,
        (0.1,),
        1 / 255,
        {"axis": 1},
    ),
)


def numpy_type(target: str) -> type[np.integer]:
    return qgraph.get_target(target).activations.dtype.numpy().type


def zero_point(dtype: type[np.integer], index: int) -> np.ndarray:
    """A different zero point per tensor, near the middle of the type's range."""
    info = np.iinfo(dtype)
    middle = (int(info.min) + int(info.max) + 1) // 2
    return np.array(middle + 7 * index - 10, dtype)


def output_zero_point(group: Group, dtype: type[np.integer]) -> np.ndarray:
    """The type's minimum for the [0, 1] outputs of Sigmoid and Softmax, else the middle."""
    if group.op_type in ("Sigmoid", "Softmax"):
        return np.array(np.iinfo(dtype).min, dtype)
    return zero_point(dtype, 0)


def qdq_group(
    group: Group,
    dtype: type[np.integer],
    *,
    opset: int = OPSET,
    scale_type: type[np.floating] = np.float32,
    y_zero_point: np.ndarray | None = None,
) -> onnx.ModelProto:
    """The group with integer graph inputs of ``dtype`` and its Q output as graph output."""
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, initializers = [], {}
    for index, (name, scale) in enumerate(zip(group.inputs, group.scales, strict=True)):
        nodes.append(
            helper.make_node("DequantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_f"])
        )
        initializers[f"{name}_s"] = np.array(scale, scale_type)
        initializers[f"{name}_z"] = zero_point(dtype, index + 1)
    nodes.append(
        helper.make_node(
            group.op_type, [f"{n}_f" for n in group.inputs], ["y_f"], **group.attributes
        )
    )
    nodes.append(helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y"]))
    initializers["y_s"] = np.array(group.output_scale, scale_type)
    initializers["y_z"] = output_zero_point(group, dtype) if y_zero_point is None else y_zero_point
    graph = helper.make_graph(
        nodes,
        "group",
        [helper.make_tensor_value_info(n, element, s) for n, s in group.inputs.items()],
        [helper.make_tensor_value_info("y", element, group.output)],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def load(proto: onnx.ModelProto) -> ir.Model:
    return ShapeInferencePass()(ir.serde.deserialize_model(proto)).model


def lower(proto: onnx.ModelProto, target: str) -> tuple[ir.Model, dict[str, int]]:
    result = LowerPass(qgraph.get_target(target))(load(proto))
    return result.model, result.details.applied


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def full_range_feeds(proto: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Random integers over each input's whole range, its minimum and maximum included."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        array.reshape(-1)[:2] = (info.min, info.max)
        feeds[value.name] = array
    return feeds


def steps_apart(proto: onnx.ModelProto, lowered: ir.Model, feeds) -> tuple[int, np.ndarray]:
    """The largest integer difference of the lowered output from the Q/DQ one, and the Q/DQ
    output."""
    expected = verify.run(verify.session(proto.SerializeToString()), feeds)["y"]
    actual = verify.run(verify.session(lowered), feeds)["y"]
    assert actual.dtype == expected.dtype
    return int(np.abs(actual.astype(np.int64) - expected).max()), expected


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_the_group_becomes_its_qlinear_op_within_one_step(group, target):
    proto = qdq_group(group, numpy_type(target))
    lowered, applied = lower(proto, target)
    assert {rule: n for rule, n in applied.items() if n} == {group.rule: 1}
    assert ops(lowered) == [group.qlinear]
    for seed in range(3):
        steps, expected = steps_apart(proto, lowered, full_range_feeds(proto, seed))
        assert steps <= 1
        assert np.unique(expected).size > 1, "a constant output would prove nothing"


def group_of(rule: str) -> Group:
    return next(group for group in GROUPS if group.rule == rule)


NEEDING_ZERO_POINTS = (
    group_of("qlinear-add"),
    group_of("qlinear-concat"),
    dataclasses.replace(group_of("qlinear-global-average-pool"), output_scale=0.05),
    group_of("qlinear-softmax"),
)
"""Groups whose kernels need zero points (GlobalAveragePool's mean, about 6.4 with zero points
0, would saturate its output at a scale of 0.01)."""


@pytest.mark.parametrize("group", NEEDING_ZERO_POINTS, ids=str)
def test_absent_zero_points_become_scalar_zeros(group):
    """A Q or DQ without a zero point means uint8 and 0; these kernels want one spelled out."""
    proto = qdq_group(group, np.uint8)
    for node in proto.graph.node:
        del node.input[2:]
    lowered, applied = lower(proto, "x86-avx2")
    assert applied[group.rule] == 1 and group.qlinear in ops(lowered)
    steps, expected = steps_apart(proto, lowered, full_range_feeds(proto, seed=0))
    assert steps <= 1 and np.unique(expected).size > 1


def test_softmax_before_opset_13_keeps_its_flattening_axis():
    """Softmax(axis=1) of opset 11 normalizes over everything after axis 1, together."""
    group = Group(
        "qlinear-softmax", "Softmax", "QLinearSoftmax", {"x": SHAPE}, SHAPE, (0.1,), 1 / 255
    )
    proto = qdq_group(group, np.uint8, opset=11)
    lowered, applied = lower(proto, "x86-avx2")
    assert applied["qlinear-softmax"] == 1
    attributes = next(iter(lowered.graph)).attributes
    assert attributes.get_int("opset") == 11 and attributes.get_int("axis") == 1
    steps, _ = steps_apart(proto, lowered, full_range_feeds(proto, seed=0))
    assert steps <= 1


def reasons(model: ir.Model, target: str = "x86-avx2") -> set[str]:
    return {miss.reason for miss in near_misses(model, compiled_rules(qgraph.get_target(target)))}


def assert_not_lowered(proto: onnx.ModelProto, reason: str, target: str = "x86-avx2") -> None:
    before = ops(load(proto))
    lowered, applied = lower(proto, target)
    assert not any(applied.values()) and ops(lowered) == before
    assert reason in reasons(lowered, target)


ADD = GROUPS[0]
SOFTMAX = GROUPS[-2]


def test_a_float_input_is_a_near_miss():
    proto = qdq_group(Group("", "Add", "", {"a": SHAPE}, SHAPE, (0.05,), 0.07), np.uint8)
    proto.graph.node[1].input.append("c")
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(SHAPE, np.float32), "c"))
    assert_not_lowered(proto, "its input 'c' is float, not behind a DequantizeLinear")


def test_inputs_of_another_type_than_the_output_are_a_near_miss():
    proto = qdq_group(ADD, np.uint8)
    b = next(v for v in proto.graph.input if v.name == "b")
    b.type.tensor_type.elem_type = TensorProto.INT8
    _replace_initializer(proto, "b_z", np.array(3, np.int8))
    assert_not_lowered(
        proto, "its input 'b_f' is INT8 and its output UINT8; QLinearAdd takes one 8-bit type"
    )


def test_sixteen_bit_activations_are_a_near_miss():
    proto = qdq_group(ADD, np.uint16)
    assert_not_lowered(proto, "its input 'a_f' is UINT16, not 8-bit")


def test_per_channel_scales_are_a_near_miss():
    proto = qdq_group(ADD, np.uint8)
    _replace_initializer(proto, "a_s", np.full(3, 0.05, np.float32))
    _replace_initializer(proto, "a_z", np.full(3, 128, np.uint8))
    proto.graph.node[0].attribute.append(helper.make_attribute("axis", 1))
    assert_not_lowered(proto, "its input 'a_f' has more than one scale")


def test_float16_scales_are_a_near_miss():
    proto = qdq_group(ADD, np.uint8, scale_type=np.float16)
    assert_not_lowered(proto, "its input 'a_f' scale is FLOAT16; the QLinear kernels take FLOAT")


def test_an_average_pool_with_dilations_is_a_near_miss():
    group = Group(
        "",
        "AveragePool",
        "",
        {"x": [1, 3, 7, 7]},
        [1, 3, 3, 3],
        (0.05,),
        0.03,
        {"kernel_shape": [3, 3], "dilations": [2, 2]},
    )
    proto = qdq_group(group, np.uint8)
    assert_not_lowered(proto, "its dilations are [2, 2]; QLinearAveragePool has none")


def test_a_float_value_read_outside_the_group_stays():
    """The op's float output is also a graph output: lowering would have to drop it."""
    proto = qdq_group(ADD, np.uint8)
    proto.graph.output.append(helper.make_tensor_value_info("y_f", TensorProto.FLOAT, SHAPE))
    before = ops(load(proto))
    lowered, applied = lower(proto, "x86-avx2")
    assert not any(applied.values()) and ops(lowered) == before


def _replace_initializer(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    index = next(i for i, t in enumerate(proto.graph.initializer) if t.name == name)
    proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))


def foreign_float_model() -> onnx.ModelProto:
    """x, z [1, 4, 6, 6]: GlobalAveragePool(Concat(Sigmoid(x) * z + x, Sigmoid(x)))."""
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["s", "z"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "x"], ["a"], name="add"),
        helper.make_node("Concat", ["a", "s"], ["c"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["c"], ["y"], name="pool"),
    ]
    shape = [1, 4, 6, 6]
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])],
    )
    opsets = [helper.make_opsetid("", OPSET)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def float_batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for n in ("x", "z")}
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("target", "activation_type"), [("x86-avx2", "QUInt8"), ("arm64", "QInt8")]
)
def test_an_onnxruntime_quantize_static_model_lowers_and_matches(tmp_path, target, activation_type):
    from onnxruntime import quantization

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(float_batches(4, seed=1))

        def get_next(self):
            return next(self.batches, None)

    source, quantized = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(foreign_float_model(), source)
    quantization.quantize_static(
        source,
        quantized,
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=getattr(quantization.QuantType, activation_type),
    )
    qdq = load(onnx.load(quantized))
    lowered = ir.from_proto(ir.to_proto(qdq))
    verify.expose_quantized(lowered)
    applied = LowerPass(qgraph.get_target(target))(lowered).details.applied
    fired = {rule for rule, n in applied.items() if n}
    assert fired == {
        "qlinear-add",
        "qlinear-mul",
        "qlinear-sigmoid",
        "qlinear-concat",
        "qlinear-global-average-pool",
    }
    assert not {"Add", "Mul", "Sigmoid", "Concat", "GlobalAveragePool"} & set(ops(lowered))
    reference = verify.QuantizedReference.of(qdq)
    session = verify.session(lowered)
    for feeds in float_batches(3, seed=7):
        assert not reference.one_step_mismatches(feeds, verify.run(session, feeds))
