"""Attention over a KV cache becomes GroupQueryAttention, computing what the export computes.

The model is one layer of the dynamo exporter's Llama attention, written out node by node as
it writes it (``models/smollm2_decoder.py``'s graph): rotary embedding from ``position_ids``,
the cache Concat, grouped heads by Unsqueeze/Expand/Reshape, the additive causal and padding
mask from ``attention_mask``.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.generation import CONTEXT_LENGTH_KEY
from qgraph.passes.canonicalize import ShapeInferencePass
from qgraph.passes.fusion import FusionPass, PackProjectionsPass, RuntimeFusionPass
from qgraph.passes.fusion.attention import RULE_NAME
from qgraph.passes.fusion.packing import ATTENTION_RULE as PACKED_ATTENTION_RULE
from qgraph.passes.fusion.packing import RULE_NAME as PACKING_RULE
from qgraph.recipe import quant_options

HEADS, KV_HEADS, HEAD = 4, 2, 16
"""16 channels a head: the least the kernel rotates itself."""
SMALL_HEAD = 8
CONTEXT = 64
RNG = np.random.default_rng(5)
FLOAT_MIN = np.finfo(np.float32).min


def _constants(head: int) -> dict[str, np.ndarray]:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head, 2) / head))
    width = HEADS * head
    values = {
        "wq": RNG.normal(0, 0.3, (width, width)),
        "wk": RNG.normal(0, 0.3, (width, KV_HEADS * head)),
        "wv": RNG.normal(0, 0.3, (width, KV_HEADS * head)),
        "wo": RNG.normal(0, 0.3, (width, width)),
        "inv_freq": inv_freq,
        "scale": np.array(head**-0.5),
        "zero_f": np.array(0.0),
        "min_f": np.array(FLOAT_MIN),
    }
    ints = {
        "q_split": [0, 0, HEADS, head],
        "kv_split": [0, 0, KV_HEADS, head],
        "grouped": [0, HEADS, -1, head],
        "merged": [0, 0, width],
        "half": [head // 2],
        "end": [2**62],
        "zero": [0],
        "one": [1],
        "two": [2],
        "axis3": [3],
        "axes01": [0, 1],
        "axes12": [1, 2],
    }
    values = {k: np.asarray(v, np.float32) for k, v in values.items()}
    values["group_shape"] = np.array([1, 1, HEADS // KV_HEADS, 1, 1], np.int64)
    values.update({k: np.array(v, np.int64) for k, v in ints.items()})
    values["zero_scalar"] = np.array(0, np.int64)
    values["one_scalar"] = np.array(1, np.int64)
    return values


def _mask_nodes(causal: bool) -> list:
    """The additive mask [B, 1, S, T]: key k visible to query q iff k <= P + q (when
    ``causal``) and attention_mask[b, k] is 1."""
    node = helper.make_node
    nodes = [
        node("Shape", ["x"], ["s_dim"], start=1, end=2),
        node("Shape", ["attention_mask"], ["t_dim"], start=1, end=2),
        node("Squeeze", ["s_dim"], ["s"]),
        node("Squeeze", ["t_dim"], ["t"]),
        node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
        node("Unsqueeze", ["mask_bool", "axes12"], ["padding"]),
    ]
    if not causal:
        return [*nodes, node("Where", ["padding", "zero_f", "min_f"], ["mask"])]
    return [
        *nodes,
        node("Range", ["zero_scalar", "t", "one_scalar"], ["keys"]),
        node("Sub", ["t", "s"], ["past"]),
        node("Range", ["past", "t", "one_scalar"], ["queries"]),
        node("Unsqueeze", ["queries", "one"], ["query_column"]),
        node("LessOrEqual", ["keys", "query_column"], ["seen"]),
        node("Unsqueeze", ["seen", "axes01"], ["seen4"]),
        node("And", ["seen4", "padding"], ["visible"]),
        node("Where", ["visible", "zero_f", "min_f"], ["mask"]),
    ]


def _heads(source: str, split: str, name: str) -> list:
    return [
        helper.make_node("Reshape", [source, split], [f"{name}_split"]),
        helper.make_node("Transpose", [f"{name}_split"], [name], perm=[0, 2, 1, 3]),
    ]


def _rope(x: str, swapped: bool = False) -> list:
    """``x * cos4 + rotate_half(x) * sin4``; ``swapped`` writes every operand pair reversed."""
    node = helper.make_node
    if swapped:
        return [
            node("Mul", ["cos4", x], [f"{x}_cos"]),
            node("Slice", [x, "half", "end", "axis3"], [f"{x}_upper"]),
            node("Slice", [x, "zero", "half", "axis3"], [f"{x}_lower"]),
            node("Neg", [f"{x}_upper"], [f"{x}_neg"]),
            node("Concat", [f"{x}_neg", f"{x}_lower"], [f"{x}_turned"], axis=-1),
            node("Mul", ["sin4", f"{x}_turned"], [f"{x}_sin"]),
            node("Add", [f"{x}_sin", f"{x}_cos"], [f"{x}_rot"]),
        ]
    return [
        node("Mul", [x, "cos4"], [f"{x}_cos"]),
        node("Slice", [x, "half", "end", "axis3"], [f"{x}_upper"]),
        node("Slice", [x, "zero", "half", "axis3"], [f"{x}_lower"]),
        node("Neg", [f"{x}_upper"], [f"{x}_neg"]),
        node("Concat", [f"{x}_neg", f"{x}_lower"], [f"{x}_turned"], axis=-1),
        node("Mul", [f"{x}_turned", "sin4"], [f"{x}_sin"]),
        node("Add", [f"{x}_cos", f"{x}_sin"], [f"{x}_rot"]),
    ]


def _grouped(present: str) -> list:
    return [
        helper.make_node("Unsqueeze", [present, "two"], [f"{present}_5d"]),
        helper.make_node("Expand", [f"{present}_5d", "group_shape"], [f"{present}_rep"]),
        helper.make_node("Reshape", [f"{present}_rep", "grouped"], [f"{present}_grouped"]),
    ]


def attention_layer(
    causal: bool = True,
    scale_op: str = "Mul",
    masked: bool = True,
    swapped: bool = False,
    cached: bool = True,
    head: int = HEAD,
    context: int | None = CONTEXT,
    shifted_angles: bool = False,
    position_batch: int | str = "batch",
):
    """One exported attention layer with its cache (``masked``: the mask is added;
    ``cached``: the past is concatenated in front, else the layer ignores it; ``context``: the
    context length its metadata states; ``shifted_angles``: every token's angle also grows
    with the row's first position, so it depends on more than its own; ``position_batch``:
    1 for positions every row shares)."""
    node = helper.make_node
    shift = [
        node("ReduceMin", ["positions_f0", "one"], ["first_f"], keepdims=1),
        node("Add", ["positions_f0", "first_f"], ["positions_f"]),
    ]
    nodes = [
        *_mask_nodes(causal),
        node("Unsqueeze", ["position_ids", "two"], ["positions3"]),
        node(
            "Cast",
            ["positions3"],
            ["positions_f0" if shifted_angles else "positions_f"],
            to=TensorProto.FLOAT,
        ),
        *(shift if shifted_angles else []),
        node("Mul", ["positions_f", "inv_freq"], ["freqs"]),
        node("Concat", ["freqs", "freqs"], ["angles"], axis=-1),
        node("Cos", ["angles"], ["cos"]),
        node("Sin", ["angles"], ["sin"]),
        node("Unsqueeze", ["cos", "one"], ["cos4"]),
        node("Unsqueeze", ["sin", "one"], ["sin4"]),
        node("MatMul", ["x", "wq"], ["q"]),
        node("MatMul", ["x", "wk"], ["k"]),
        node("MatMul", ["x", "wv"], ["v"]),
        *_heads("q", "q_split", "q_h"),
        *_heads("k", "kv_split", "k_h"),
        *_heads("v", "kv_split", "v_h"),
        *_rope("q_h", swapped),
        *_rope("k_h", swapped),
        *(
            [
                node("Concat", ["past_key", "k_h_rot"], ["present_key"], axis=-2),
                node("Concat", ["past_value", "v_h"], ["present_value"], axis=-2),
            ]
            if cached
            else [
                node("Identity", ["k_h_rot"], ["present_key"]),
                node("Identity", ["v_h"], ["present_value"]),
            ]
        ),
        *_grouped("present_key"),
        *_grouped("present_value"),
        node("Transpose", ["present_key_grouped"], ["keys_t"], perm=[0, 1, 3, 2]),
        node("MatMul", ["q_h_rot", "keys_t"], ["scores"]),
        node(scale_op, ["scores", "scale"], ["scaled"]),
        *(
            [node("Add", ["mask", "scaled"] if swapped else ["scaled", "mask"], ["masked"])]
            if masked
            else []
        ),
        node("Softmax", ["masked" if masked else "scaled"], ["probabilities"], axis=-1),
        node("MatMul", ["probabilities", "present_value_grouped"], ["context"]),
        node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        node("Reshape", ["context_t", "merged"], ["context_merged"]),
        node("MatMul", ["context_merged", "wo"], ["y"]),
    ]
    constants = _constants(head)
    if scale_op == "Div":
        constants["scale"] = 1.0 / constants["scale"]
    width = HEADS * head
    cache = ["batch", KV_HEADS, "past", head]
    grown = ["batch", KV_HEADS, "total", head]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", width]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, [position_batch, "sequence"]
            ),
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
            helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", width]),
            helper.make_tensor_value_info("present_key", TensorProto.FLOAT, grown),
            helper.make_tensor_value_info("present_value", TensorProto.FLOAT, grown),
        ],
        [numpy_helper.from_array(a, n) for n, a in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    if context is not None:
        helper.set_model_props(model, {CONTEXT_LENGTH_KEY: str(context)})
    return model


def feeds(
    batch: int, new: int, past: int, left_padding: int = 0, head: int = HEAD
) -> dict[str, np.ndarray]:
    """A step of ``new`` tokens over ``past`` cached ones; row 1 left-padded if asked."""
    mask = np.ones((batch, past + new), np.int64)
    positions = np.tile(np.arange(past, past + new), (batch, 1))
    if left_padding:
        mask[1, :left_padding] = 0
        positions[1] = np.maximum(positions[1] - left_padding, 1)
    return {
        "x": RNG.standard_normal((batch, new, HEADS * head)).astype(np.float32),
        "attention_mask": mask,
        "position_ids": positions,
        "past_key": RNG.standard_normal((batch, KV_HEADS, past, head)).astype(np.float32),
        "past_value": RNG.standard_normal((batch, KV_HEADS, past, head)).astype(np.float32),
    }


def fused(proto, target: str = "x86-avx2"):
    """The model after the fusion and runtime-fusion passes; the latter's report."""
    model = ShapeInferencePass()(qgraph.load(proto)).model
    FusionPass(qgraph.get_target(target))(model)
    result = RuntimeFusionPass(qgraph.get_target(target), explain=True)(model)
    return result.model, result.details


def op_types(model) -> set[str]:
    return {n.op_type for n in model.graph}


@pytest.mark.parametrize(("scale_op", "swapped"), [("Mul", False), ("Div", False), ("Mul", True)])
def test_attention_becomes_group_query_attention(scale_op, swapped):
    proto = attention_layer(scale_op=scale_op, swapped=swapped)
    model, report = fused(proto)
    assert report.applied[RULE_NAME] == 1
    step = feeds(2, 3, 4)
    assert not verify.compare(verify.run(proto.SerializeToString(), step), verify.run(model, step))
    assert "GroupQueryAttention" in op_types(model)
    assert not {"Softmax", "Neg", "Transpose", "RotaryEmbedding"} & op_types(model), "all gone"
    outputs = [v.name for v in model.graph.outputs]
    assert outputs == ["y", "present_key", "present_value"], "cache outputs keep their names"


ROTATIONS = {
    "inside": ({}, None),
    "no-context": ({"context": None}, f"metadata has no {CONTEXT_LENGTH_KEY}"),
    "small-head": ({"head": SMALL_HEAD}, f"heads of {SMALL_HEAD} channels, not a multiple"),
    "shifted-angles": ({"shifted_angles": True}, "depend on more than its own position"),
}
"""Layer variants -> (``attention_layer`` arguments, why the rotation stays outside or None)."""


def rotation_layer(form: str):
    """(the layer, its fused model, the feeds' head size) for one of ``ROTATIONS``."""
    arguments, reason = ROTATIONS[form]
    proto = attention_layer(**arguments)
    model, report = fused(proto)
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    [attention] = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    misses = [m.reason for m in report.near_misses if m.rule == RULE_NAME]
    if reason is None:
        assert not rotary and attention.attributes.get_int("do_rotary", 0) == 1
        assert not misses
    else:
        assert len(rotary) == 2 and attention.attributes.get_int("do_rotary", 0) == 0
        [miss] = misses
        assert miss.startswith("rotation kept outside") and reason in miss
    return proto, model, arguments.get("head", HEAD)


@pytest.mark.parametrize("form", list(ROTATIONS))
@pytest.mark.parametrize(
    ("batch", "new", "past"),
    [(2, 5, 0), (2, 1, 6), (1, 4, 6), (3, 4, 6), (1, 1, CONTEXT - 1)],
    ids=["prefill", "decode-step", "continuation", "batched-continuation", "last-position"],
)
def test_fused_attention_computes_what_the_export_does(form, batch, new, past):
    proto, model, head = rotation_layer(form)
    step = feeds(batch, new, past, head=head)
    expected = verify.run(proto.SerializeToString(), step)
    assert not verify.compare(expected, verify.run(model, step))


@pytest.mark.parametrize("form", ["inside", "no-context"])
def test_left_padding_is_honoured_where_a_query_sees_a_key(form):
    """Prefill with row 1 left-padded by 2: its first 2 queries see no key at all, so the
    export averages every value there and the kernel the causal ones; every other row, and
    every later decode step, is the same. Row 1's positions are not consecutive (1, 1, 0, 1,
    2), which the kernel rotating inside must honour token by token."""
    proto, model, _ = rotation_layer(form)
    prefill = feeds(2, 5, 0, left_padding=2)
    expected = verify.run(proto.SerializeToString(), prefill)
    actual = verify.run(model, prefill)
    seen = np.ones((2, 5), bool)
    seen[1, :2] = False
    assert not verify.compare({"y": expected["y"][seen]}, {"y": actual["y"][seen]})
    step = feeds(2, 1, 5, left_padding=2)
    assert not verify.compare(verify.run(proto.SerializeToString(), step), verify.run(model, step))


def test_a_position_past_the_context_is_refused_by_the_runtime():
    """The tables end at the stated context; onnxruntime refuses a position past them rather
    than reading beyond."""
    _, model, _ = rotation_layer("inside")
    with pytest.raises(Exception, match=r"cos_cache|cos/sin cache"):
        verify.run(model, feeds(1, 1, CONTEXT))


def test_angles_every_row_shares_are_left_alone():
    """Positions [1, S] give angles every row of the batch shares; the kernels read one row of
    angles (or one position) per token, so the attention stays as exported."""
    proto = attention_layer(position_batch=1)
    model, report = fused(proto)
    assert "Softmax" in op_types(model)
    [reason] = [m.reason for m in report.near_misses if m.rule == RULE_NAME]
    assert "are not one row per token of the query" in reason
    step = feeds(2, 3, 4)
    step["position_ids"] = step["position_ids"][:1]
    assert not verify.compare(verify.run(proto.SerializeToString(), step), verify.run(model, step))


def test_a_mask_that_lets_queries_see_later_keys_is_left_alone():
    model, report = fused(attention_layer(causal=False))
    assert "Softmax" in op_types(model)
    [reason] = [m.reason for m in report.near_misses if m.rule == RULE_NAME]
    assert "lets queries see later keys" in reason


def test_attention_without_a_mask_is_left_alone():
    """Without a mask the exported attention sees every key; the kernel would hide later ones."""
    proto = attention_layer(masked=False)
    model, report = fused(proto)
    assert "Softmax" in op_types(model)
    [reason] = [m.reason for m in report.near_misses if m.rule == RULE_NAME]
    assert "no mask" in reason


def test_attention_without_a_cache_is_left_alone_and_says_so():
    model, report = fused(attention_layer(cached=False))
    assert "Softmax" in op_types(model)
    [reason] = [m.reason for m in report.near_misses if m.rule == RULE_NAME]
    assert reason.startswith("no KV cache")


def test_no_fusion_where_the_runtime_has_no_contrib_ops():
    model, report = fused(attention_layer(), target="tensorrt")
    assert RULE_NAME not in report.applied
    assert "GroupQueryAttention" not in op_types(model)


@pytest.mark.parametrize("form", ["inside", "no-context"])
def test_packed_projections_reach_the_kernel_whole_where_it_rotates(form):
    """With the rotation inside, packing q, k and v hands the kernel the packed tensor (no
    Split); with it outside, the RotaryEmbeddings read two parts and the Split stays."""
    proto, model, _ = rotation_layer(form)
    report = PackProjectionsPass(quant_options(mode="weight-only"))(model).details
    [attention] = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert report.applied[PACKING_RULE] == 1
    inside = form == "inside"
    assert report.applied[PACKED_ATTENTION_RULE] == int(inside)
    assert ("Split" in op_types(model)) != inside
    if inside:
        assert attention.inputs[0].producer().op_type == "MatMul"
        assert attention.inputs[1] is None and attention.inputs[2] is None
    for step in (feeds(2, 5, 0, left_padding=2), feeds(2, 1, 5), feeds(3, 4, 6)):
        expected = verify.run(proto.SerializeToString(), step)
        actual = verify.run(model, step)
        seen = np.ones(expected["y"].shape[:2], bool)
        seen[1, : 2 if step["attention_mask"][1, 0] == 0 else 0] = False
        assert not verify.compare({"y": expected["y"][seen]}, {"y": actual["y"][seen]})
        assert not verify.compare(
            {k: expected[k] for k in ("present_key", "present_value")},
            {k: actual[k] for k in ("present_key", "present_value")},
        )
