"""qgraph.passes.canonicalize: each pass on the graphs it exists for, checked in onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import qgraph
from qgraph import verify
from qgraph.options import CompileOptions
from qgraph.passes import PIPELINE, canonicalize
from qgraph.pipeline import Phase, Pipeline
from qgraph.registry import PassContext
from qgraph.targets import get_target

CONTEXT = PassContext(get_target("x86-avx2"), CompileOptions())


def built(name: str) -> ir.passes.PassBase:
    """The registered canonicalize pass called ``name``, as the pipeline builds it."""
    return canonicalize.BUILDERS[name](CONTEXT)


def canonicalize_pipeline() -> Pipeline:
    pipeline = Pipeline()
    for info in PIPELINE:
        if info.phase is not Phase.CANONICALIZE:
            continue
        pass_ = canonicalize.BUILDERS[info.name](CONTEXT)
        if pass_ is not None:  # upgrade-opset runs only when quantizing
            pipeline.add(pass_, info.phase, name=info.name)
    return pipeline


def rewrite_and_check(proto: onnx.ModelProto, feeds: dict, *passes: ir.passes.PassBase) -> ir.Model:
    """Apply ``passes`` (default: the whole canonicalize phase) and compare with the original."""
    model = qgraph.load(proto)
    if passes:
        for pass_ in passes:
            model = pass_(model).model
    else:
        model = canonicalize_pipeline().run(model).model
    expected = verify.run(proto.SerializeToString(), feeds)
    mismatches = verify.compare(expected, verify.run(model, feeds))
    assert not mismatches, mismatches
    return model


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_constant_subgraph_is_folded(make_model):
    rng = np.random.default_rng(0)
    proto = make_model(
        [
            helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
            helper.make_node("Mul", ["W", "two"], ["W2"]),
            helper.make_node("MatMul", ["x", "W2"], ["y"]),
        ],
        {"x": [3, 4]},
        {"y": [3, 5]},
        {"Wt": rng.normal(size=(5, 4)).astype(np.float32), "two": np.array(2.0, np.float32)},
    )
    feeds = {"x": rng.normal(size=(3, 4)).astype(np.float32)}
    model = rewrite_and_check(proto, feeds, canonicalize.ConstantFoldingPass())
    assert ops(model) == ["MatMul"]


@pytest.mark.parametrize("shared", [False, True])
def test_a_large_weight_reshaped_for_its_matmul_is_folded_unless_shared(make_model, shared):
    """Old exporters reshape a classifier's weight at run time; above the input limit it is
    folded only where the Reshape is its sole reader, so nothing is copied."""
    rng = np.random.default_rng(3)
    k, n = 96, canonicalize.FOLD_INPUT_LIMIT // 96 + 1
    nodes = [
        helper.make_node("Reshape", ["Wflat", "shape"], ["W"]),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    outputs = {"y": [2, n]}
    if shared:
        nodes.append(helper.make_node("ReduceSum", ["Wflat"], ["total"], keepdims=0))
        outputs["total"] = []
    proto = make_model(
        nodes,
        {"x": [2, k]},
        outputs,
        {
            "Wflat": rng.normal(size=(k * n,)).astype(np.float32),
            "shape": np.array([k, n], np.int64),
        },
    )
    feeds = {"x": rng.normal(size=(2, k)).astype(np.float32)}
    model = rewrite_and_check(proto, feeds, canonicalize.ConstantFoldingPass())
    assert ("Reshape" in ops(model)) == shared


def test_quantize_and_dequantize_are_never_folded(make_model):
    proto = make_model(
        [
            helper.make_node("QuantizeLinear", ["w", "s"], ["wq"]),
            helper.make_node("DequantizeLinear", ["wq", "s"], ["wd"]),
            helper.make_node("DequantizeLinear", ["cq", "s"], ["cd"], domain="com.microsoft"),
            helper.make_node("Add", ["x", "wd"], ["h"]),
            helper.make_node("Add", ["h", "cd"], ["y"]),
        ],
        {"x": [4]},
        {"y": [4]},
        {
            "w": np.linspace(-1, 1, 4, dtype=np.float32),
            "s": np.array(0.01, np.float32),
            "cq": np.arange(4, dtype=np.int8),
        },
        extra_opsets={"com.microsoft": 1},
    )
    model = rewrite_and_check(
        proto, {"x": np.ones(4, np.float32)}, canonicalize.ConstantFoldingPass()
    )
    assert ops(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Add", "Add"]


def test_folding_leaves_a_graph_it_cannot_fold_whole_and_says_why(make_model, caplog):
    proto = make_model(
        [
            helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
            helper.make_node("SplitToSequence", ["c", "n"], ["seq"]),
            helper.make_node("SequenceAt", ["seq", "zero"], ["first"]),
            helper.make_node("Add", ["first", "x"], ["y"]),
        ],
        {"x": [2]},
        {"y": [2]},
        {"c": np.arange(4, dtype=np.float32), "zero": np.array(0, np.int64)},
    )
    model = qgraph.load(proto)
    before = ops(model)
    with caplog.at_level(logging.WARNING):
        result = canonicalize.ConstantFoldingPass()(model)
    assert not result.modified and ops(result.model) == before
    assert "split computed at run time" in caplog.text


def test_identity_inside_the_graph_is_removed(make_model):
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Neg", ["b"], ["y"]),
        ],
        {"x": [3]},
        {"y": [3]},
    )
    feeds = {"x": np.array([-1, 0, 2], np.float32)}
    assert ops(rewrite_and_check(proto, feeds, canonicalize.IdentityEliminationPass())) == [
        "Relu",
        "Neg",
    ]


@pytest.mark.parametrize(
    "starts, ends, axes, kept",
    [
        (
            [0, 0],
            [4, 10**9],
            [1, 0],
            False,
        ),  # every element: the second end is tf2onnx's "to the end"
        ([0, -4], [2**63 - 1, 4], [0, 1], False),  # -4 is the start of an axis of 4
        ([0, 1], [10**9, 4], [0, 1], True),  # drops a column
        ([0, 0], [10**9, 3], [0, 1], True),  # drops the last column
    ],
)
def test_a_slice_that_keeps_every_element_is_removed(make_model, starts, ends, axes, kept):
    arrays = {"starts": starts, "ends": ends, "axes": axes}
    proto = make_model(
        [
            helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["a"]),
            helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1]),
            helper.make_node("Neg", ["b"], ["y"]),
        ],
        {"x": ["n", 4]},
        {"y": None},
        {name: np.array(values, np.int64) for name, values in arrays.items()},
    )
    feeds = {"x": RNG_FEEDS.standard_normal((3, 4)).astype(np.float32)}
    model = canonicalize.ShapeInferencePass()(qgraph.load(proto)).model
    model = rewrite_and_check(ir.to_proto(model), feeds, canonicalize.IdentityEliminationPass())
    assert ops(model) == (["Slice", "Neg"] if kept else ["Neg"]), "the Transpose keeps its axes"


RNG_FEEDS = np.random.default_rng(4)


def test_identity_to_an_output_hands_its_name_to_the_producer(make_model):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"])],
        {"x": [3]},
        {"y": [3]},
    )
    model = rewrite_and_check(
        proto, {"x": np.ones(3, np.float32)}, canonicalize.IdentityEliminationPass()
    )
    assert ops(model) == ["Relu"] and [v.name for v in model.graph.outputs] == ["y"]


@pytest.mark.parametrize(
    "nodes, outputs",
    [
        # input straight to output: removing it would rename the input
        ([helper.make_node("Identity", ["x"], ["y"])], ["y"]),
        # the source is itself an output: both outputs must keep their names
        (
            [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"])],
            ["a", "y"],
        ),
    ],
)
def test_identity_that_carries_the_interface_is_kept(make_model, nodes, outputs):
    proto = make_model(nodes, {"x": [3]}, {name: [3] for name in outputs})
    model = rewrite_and_check(
        proto, {"x": np.array([-1, 0, 1], np.float32)}, canonicalize.IdentityEliminationPass()
    )
    assert "Identity" in ops(model) and [v.name for v in model.graph.outputs] == outputs


def test_identity_of_an_outer_value_in_a_branch_keeps_the_outer_name(make_model):
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [3])],
    )
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        {"x": [3]},
        {"y": [3]},
    )
    proto.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    for cond in (True, False):
        feeds = {"x": np.array([-1, 0, 1], np.float32), "cond": np.array(cond)}
        model = rewrite_and_check(proto, feeds, canonicalize.IdentityEliminationPass())
    assert model.graph.node(0).outputs[0].name == "a"


def test_scan_body_emitting_its_state_twice_keeps_working():
    """The onnx node test that onnx_ir 1.1's identity elimination breaks."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
            helper.make_node("Identity", ["sum_out"], ["scan_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["initial", "x"], ["y", "z"], num_scan_inputs=1, body=body)],
        "scan",
        [
            helper.make_tensor_value_info("initial", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)
    feeds = {"initial": np.zeros(2, np.float32), "x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    rewrite_and_check(proto, feeds, canonicalize.IdentityEliminationPass())


def test_shape_inference_keeps_sequence_types_and_fills_shapes(make_model):
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("SequenceConstruct", ["a", "x"], ["seq"]),
            helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
        ],
        {"x": [2, 3]},
        {"y": [4, 3]},
    )
    model = rewrite_and_check(
        proto, {"x": np.ones((2, 3), np.float32)}, canonicalize.ShapeInferencePass()
    )
    values = ir.convenience.create_value_mapping(model.graph)
    assert isinstance(values["seq"].type, ir.SequenceType)
    assert values["a"].shape == ir.Shape([2, 3]) and values["a"].dtype == ir.DataType.FLOAT


def test_shape_inference_never_serializes_large_weights(make_model, monkeypatch):
    big = np.zeros((64, 64), np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], {"x": [2, 64]}, {"y": None}, {"W": big}
    )
    seen = {}
    real = onnx.shape_inference.infer_shapes

    def spy(model_proto, **kwargs):
        seen["bytes"] = model_proto.ByteSize()
        return real(model_proto, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    model = canonicalize.ShapeInferencePass()(qgraph.load(proto)).model
    assert seen["bytes"] < big.nbytes // 10
    assert model.graph.outputs[0].shape == ir.Shape([2, 64])
    weight = model.graph.initializers["W"]
    assert weight.const_value is not None
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert not weight.is_graph_input(), "the weight must not stay marked as a graph input"


def test_cse_merges_repeated_work_but_not_random_draws(make_model):
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["x"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        {"x": [3]},
        {"y": [3]},
    )
    model = rewrite_and_check(
        proto, {"x": np.array([-1, 0, 1], np.float32)}, built("common-subexpression-elimination")
    )
    assert ops(model) == ["Relu", "Add"]
    random = make_model(
        [
            helper.make_node("RandomUniformLike", ["x"], ["a"], seed=1.0),
            helper.make_node("RandomUniformLike", ["x"], ["b"], seed=1.0),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        {"x": [3]},
        {"y": [3]},
    )
    assert (
        ops(canonicalize_pipeline().run(qgraph.load(random)).model).count("RandomUniformLike") == 2
    )


def test_dead_code_and_unused_weights_go(make_model):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])],
        {"x": [3]},
        {"y": [3]},
        {"orphan": np.ones(3, np.float32)},
    )
    model = rewrite_and_check(proto, {"x": np.ones(3, np.float32)})
    assert ops(model) == ["Relu"] and "orphan" not in model.graph.initializers


def test_constant_nodes_become_initializers(make_model):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [32], np.arange(32, dtype=np.float32))
    proto = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=weight),
            helper.make_node("Add", ["x", "w"], ["y"]),
        ],
        {"x": [32]},
        {"y": [32]},
    )
    model = rewrite_and_check(proto, {"x": np.ones(32, np.float32)}, built("lift-constants"))
    assert ops(model) == ["Add"] and "w" in model.graph.initializers


ELEMENTWISE = ("Add", "Sub", "Mul", "Max", "Min")
UNARY = ("Relu", "Neg", "Abs", "Identity")


@st.composite
def elementwise_graphs(draw):
    """Random DAGs over x [2, 3] and constants, with repeats, identities and dead ends."""
    values = ["x"]
    constants: dict[str, np.ndarray] = {}
    nodes = []
    for i in range(draw(st.integers(2, 14))):
        if draw(st.booleans()):
            name = f"c{i}"
            constants[name] = np.array(
                draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=3, max_size=3)),
                np.float32,
            )
            values.append(name)
        if draw(st.booleans()):
            op = draw(st.sampled_from(UNARY))
            inputs = [draw(st.sampled_from(values))]
        else:
            op = draw(st.sampled_from(ELEMENTWISE))
            inputs = [draw(st.sampled_from(values)), draw(st.sampled_from(values))]
        nodes.append(helper.make_node(op, inputs, [f"v{i}"]))
        values.append(f"v{i}")
    return nodes, constants, f"v{len(nodes) - 1}"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(graph=elementwise_graphs(), seed=st.integers(0, 2**16))
def test_canonicalize_keeps_random_graphs_equal_and_is_idempotent(make_model, graph, seed):
    nodes, constants, output = graph
    proto = make_model(nodes, {"x": [2, 3]}, {output: None}, constants)
    feeds = {"x": np.random.default_rng(seed).normal(size=(2, 3)).astype(np.float32)}
    model = rewrite_and_check(proto, feeds)
    assert [v.name for v in model.graph.outputs] == [output]
    again = canonicalize_pipeline().run(model)
    changed = [r.name for r in again.records if r.modified]
    assert changed == [], f"second canonicalize still changed the model: {changed}"


def test_opset_upgrade_converts_old_exports_and_leaves_new_ones():
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "old",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 11)],
        ir_version=7,
    )
    model = qgraph.load(proto)
    assert canonicalize.OpsetUpgradePass(13)(model).modified
    assert model.opset_imports[""] == 13 and [n.op_type for n in model.graph] == ["Relu"]
    assert not canonicalize.OpsetUpgradePass(13)(model).modified


def test_a_matmul_inside_a_local_function_is_inlined_and_quantized():
    """y = f(x), f a model-local function holding x W: quantizing, the call becomes its body
    and the MatMul is quantized like any other (before, it was neither quantized nor listed)."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    function = onnx.helper.make_function(
        "local",
        "f",
        ["a", "w"],
        ["b"],
        [onnx.helper.make_node("MatMul", ["a", "w"], ["b"])],
        [onnx.helper.make_opsetid("", 17)],
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("f", ["x", "W"], ["y"], domain="local", name="call")],
        "calls",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    proto = onnx.helper.make_model(
        graph,
        functions=[function],
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)],
        ir_version=8,
    )
    data = [{"x": rng.standard_normal((4, 16)).astype(np.float32)}]
    options = qgraph.CompileOptions(quantization=qgraph.quant_options(calib=data, budget="none"))
    result = qgraph.compile_model(proto, "x86-vnni", options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    assert annotate.annotated["MatMul"] == 1
    assert not any(node.domain == "local" for node in result.model.graph)
    assert not result.model.functions
