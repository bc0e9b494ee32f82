"""An int8 KV cache: GroupQueryAttention stores keys and values in int8 with calibrated scales.

The layer is one ``GroupQueryAttention`` over a cache (q, k, v projections of ``x``, its output
the attention's), rotating inside the kernel, before it (``RotaryEmbedding``), or not at all.
The bound is the module's: a stored entry within ``s / 2`` of its float value moves a score by
at most ``eps = scale sum_c |q_c| s_k[c] / 2 <= scale |q|_2 |s_k|_2 / 2`` (Cauchy-Schwarz; a
rotation keeps ``|q|_2``), the softmax weights by a factor within ``e^(+-2 eps)``, and so an
output by at most ``(e^(2 eps) - 1) max|v| + max s_v / 2``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.errors import QGraphError
from qgraph.generation import CacheCodec
from qgraph.options import CompileOptions
from qgraph.passes.qdq.kv_cache import INT8_LEVELS, CacheRange, Pairing
from qgraph.recipe import quant_options

HEADS, KV_HEADS, HEAD, WIDTH = 4, 2, 16, 32
CONTEXT = 128
PAST, KEY = "past_key_values.0.key", "present.0.key"
PAST_VALUE, VALUE = "past_key_values.0.value", "present.0.value"
RNG = np.random.default_rng(11)
WEIGHTS = {
    p: RNG.normal(0, 0.4, (WIDTH, heads * HEAD))
    for p, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
}
ROTATIONS = ("inside", "outside", "none")


def _tables() -> dict[str, np.ndarray]:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, HEAD, 2) / HEAD))
    angles = np.arange(CONTEXT)[:, None] * inv_freq[None, :]
    return {"cos": np.cos(angles), "sin": np.sin(angles)}


def gqa_layer(rotation: str = "inside", interleaved: int = 0) -> onnx.ModelProto:
    """x -> GroupQueryAttention(x Wq, x Wk, x Wv, cache) -> y, rotated per ``rotation``."""
    node = helper.make_node
    lengths = [
        node("ReduceSum", ["attention_mask", "one"], ["sums"], keepdims=0),
        node("Sub", ["sums", "one"], ["last"]),
        node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        node("Shape", ["attention_mask"], ["total_1d"], start=1, end=2),
        node("Squeeze", ["total_1d"], ["total"]),
        node("Cast", ["total"], ["total_length"], to=TensorProto.INT32),
    ]
    projections = [node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    rotate = {"interleaved": interleaved, "rotary_embedding_dim": HEAD}
    outside = [
        node("RotaryEmbedding", [p, "position_ids", "cos", "sin"], [f"{p}_rot"],
             domain="com.microsoft", num_heads=h, **rotate)
        for p, h in (("q", HEADS), ("k", KV_HEADS))
    ]  # fmt: skip
    query_key = ["q_rot", "k_rot"] if rotation == "outside" else ["q", "k"]
    inside = rotation == "inside"
    attention = node(
        "GroupQueryAttention",
        [*query_key, "v", PAST, PAST_VALUE, "seqlens_k", "total_length",
         *(["cos", "sin", "position_ids"] if inside else [])],
        ["y", KEY, VALUE],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        **({"do_rotary": 1, "rotary_interleaved": interleaved} if inside else {}),
    )  # fmt: skip
    cache = ["batch", KV_HEADS, "past", HEAD]
    grown = ["batch", KV_HEADS, "total", HEAD]
    tensor = helper.make_tensor_value_info
    constants = {f"w{p}": w.astype(np.float32) for p, w in WEIGHTS.items()}
    constants.update({k: v.astype(np.float32) for k, v in _tables().items()})
    constants["one"] = np.array([1], np.int64)
    graph = helper.make_graph(
        [*lengths, *projections, *(outside if rotation == "outside" else []), attention],
        "gqa_layer",
        [
            tensor("x", TensorProto.FLOAT, ["batch", "sequence", WIDTH]),
            tensor("attention_mask", TensorProto.INT64, ["batch", "total"]),
            tensor("position_ids", TensorProto.INT64, ["batch", "sequence"]),
            tensor(PAST, TensorProto.FLOAT, cache),
            tensor(PAST_VALUE, TensorProto.FLOAT, cache),
        ],
        [
            tensor("y", TensorProto.FLOAT, ["batch", "sequence", HEADS * HEAD]),
            tensor(KEY, TensorProto.FLOAT, grown),
            tensor(VALUE, TensorProto.FLOAT, grown),
        ],
        [numpy_helper.from_array(a, n) for n, a in constants.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def step(x: np.ndarray, first: int, past: dict[str, np.ndarray] | None = None) -> dict:
    """Feeds of the tokens ``x`` [1, S, W] at positions ``first``.. over ``past``."""
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
    past = past or {PAST: empty, PAST_VALUE: empty}
    known = past[PAST].shape[2]
    return {
        "x": x.astype(np.float32),
        "attention_mask": np.ones((1, known + x.shape[1]), np.int64),
        "position_ids": np.arange(first, first + x.shape[1])[None],
        **past,
    }


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's cache outputs as the next step's inputs."""
    return {PAST: outputs[KEY], PAST_VALUE: outputs[VALUE]}


def prefill(first: int, count: int = 8) -> dict:
    return step(RNG.standard_normal((1, count, WIDTH)), first)


def compiled(proto: onnx.ModelProto, calibration: list[dict], tmp_path, **flags):
    """``proto`` compiled for x86 with an int8 cache, every weight left float."""
    options = quant_options(
        mode="weight-only", kv_cache="int8", calib=calibration, exclude_op=["MatMul"], **flags
    )
    output = tmp_path / "kv8.onnx"
    qgraph.compile_model(
        proto, "x86-avx2", output=output, options=CompileOptions(quantization=options)
    )
    return qgraph.load(output)


def bound(feeds: dict, codec: CacheCodec, past_values: np.ndarray) -> float:
    """The module docstring's bound on one step's output (``past_values``: every value
    attended, float)."""
    s_k, s_v = codec.scales[KEY][0], codec.scales[VALUE][0]  # [H, 1, D]
    q = (feeds["x"] @ WEIGHTS["q"]).reshape(-1, HEADS, HEAD)
    group = HEADS // KV_HEADS
    key_norms = np.repeat(np.linalg.norm(s_k.reshape(KV_HEADS, HEAD), axis=1), group)
    eps = (HEAD**-0.5 / 2 * np.linalg.norm(q, axis=-1) * key_norms).max()
    return float(np.expm1(2 * eps) * np.abs(past_values).max() + s_v.max() / 2 + 1e-5)


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_a_decode_step_over_an_int8_cache_stays_within_the_rounding_bound(rotation, tmp_path):
    """Calibrated on nine tokens at positions 0..8; run on the same tokens at 100..108: their
    keys turn each rotation pair by angles calibration never saw, which the pair norms cover
    (a channel's own maximum would saturate)."""
    proto = gqa_layer(rotation)
    tokens = RNG.standard_normal((1, 9, WIDTH))
    model = compiled(proto, [step(tokens, 0)], tmp_path)
    codec = CacheCodec.of(model.graph)
    start = step(tokens[:, :8], 100)
    float_past = verify.run(proto.SerializeToString(), start)
    stored_past = verify.run(model, codec.encode(start))
    float_step = step(tokens[:, 8:], 108, as_past(float_past))
    ours = step(tokens[:, 8:], 108, as_past(stored_past))
    expected = verify.run(proto.SerializeToString(), float_step)
    got = verify.run(model, ours)
    error = np.abs(got["y"] - expected["y"]).max()
    limit = bound(float_step, codec, expected[VALUE])
    assert 0 < error <= limit, (error, limit)
    stored = codec.decode({KEY: got[KEY]})[KEY]
    assert np.abs(stored - expected[KEY]).max() <= codec.scales[KEY].max() / 2 + 1e-6, (
        "no key saturates"
    )


def test_the_cache_interface_becomes_int8_with_the_kernel_told(tmp_path):
    model = compiled(gqa_layer(), [prefill(0)], tmp_path)
    types = {v.name: v.dtype for v in [*model.graph.inputs, *model.graph.outputs]}
    assert types[PAST] == types[KEY] == types[VALUE] == ir.DataType.INT8
    assert types["x"] == types["y"] == ir.DataType.FLOAT
    [attention] = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert attention.attributes.get_string("k_quant_type") == "PER_CHANNEL"
    assert attention.attributes.get_int("kv_cache_bit_width") == 8
    scale = CacheCodec.of(model.graph).scales[PAST]
    assert scale.shape == (1, KV_HEADS, 1, HEAD) and (scale > 0).all()


@pytest.mark.parametrize("pairing", list(Pairing))
def test_a_key_scale_covers_every_rotation_of_its_pair(pairing):
    keys = RNG.standard_normal((2, KV_HEADS, 5, HEAD)) * RNG.uniform(0.1, 3, HEAD)
    rotating, plain = CacheRange(pairing), CacheRange(None)
    rotating.update(keys)
    plain.update(keys)
    first, second = (np.arange(0, HEAD, 2), np.arange(1, HEAD, 2))
    if pairing is Pairing.HALVES:
        first, second = np.arange(HEAD // 2), np.arange(HEAD // 2, HEAD)
    turned = np.empty_like(keys)
    for angle in np.linspace(0, 2 * np.pi, 97):
        c, s = np.cos(angle), np.sin(angle)
        turned[..., first] = keys[..., first] * c - keys[..., second] * s
        turned[..., second] = keys[..., second] * c + keys[..., first] * s
        assert (np.abs(turned) <= rotating.scale() * INT8_LEVELS * (1 + 1e-6)).all()
    assert (rotating.scale() > plain.scale()).any(), "a channel's own maximum would saturate"


def test_eval_feeds_an_int8_cache_model_the_data_float_cache(tmp_path):
    from qgraph.evaluation import evaluate

    proto = gqa_layer()
    tokens = RNG.standard_normal((1, 10, WIDTH))
    compiled(proto, [step(tokens, 0)], tmp_path)
    onnx.save(proto, tmp_path / "float.onnx")
    past = verify.run(proto.SerializeToString(), step(tokens[:, :8], 3))
    np.savez(tmp_path / "batch.npz", **step(tokens[:, 8:], 11, as_past(past)))
    result = evaluate(
        tmp_path / "float.onnx", tmp_path / "kv8.onnx", tmp_path / "batch.npz", metric="generic"
    )
    assert 25 < result.figures[f"{KEY}.sqnr_db"] < 80, "read back in float, within rounding"
    assert 20 < result.figures["y.sqnr_db"] < 80


def test_a_model_without_a_cache_is_refused_by_name(tmp_path, small_model):
    options = quant_options(mode="weight-only", kv_cache="int8", calib_random=1)
    with pytest.raises(QGraphError, match="no KV cache"):
        qgraph.compile_model(small_model, "x86-avx2", options=CompileOptions(quantization=options))


def test_a_target_without_the_kernel_is_refused_by_name():
    options = quant_options(mode="weight-only", kv_cache="int8", calib=[prefill(0)])
    with pytest.raises(QGraphError, match="target 'tensorrt' has no GroupQueryAttention"):
        qgraph.compile_model(gqa_layer(), "tensorrt", options=CompileOptions(quantization=options))


def test_a_cache_read_by_another_op_is_refused_by_name():
    proto = gqa_layer()
    proto.graph.node.append(helper.make_node("Neg", [PAST], ["stray"], name="peek"))
    proto.graph.output.append(
        helper.make_tensor_value_info("stray", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD])
    )
    options = quant_options(mode="weight-only", kv_cache="int8", calib=[prefill(0)])
    with pytest.raises(QGraphError, match=f"'{PAST}' is read by Neg 'peek'"):
        qgraph.compile_model(proto, "x86-avx2", options=CompileOptions(quantization=options))


def test_an_int8_cache_needs_calibration_data():
    options = quant_options(mode="weight-only", kv_cache="int8")
    with pytest.raises(QGraphError, match=r"int8 KV cache \(--kv-cache int8\) needs calibration"):
        qgraph.compile_model(gqa_layer(), "x86-avx2", options=CompileOptions(quantization=options))


def test_the_plan_judges_rounds_with_a_float_cache_and_the_chosen_one_gets_int8(tmp_path):
    """The plan's data holds float caches: its rounds keep the cache float, and the int8
    cache is calibrated once, in the final compile."""
    tokens = RNG.standard_normal((1, 9, WIDTH))
    options = quant_options(
        kv_cache="int8", calib=[step(tokens, 0)], budget="sqnr>=10", measure=False
    )
    result = qgraph.compile_model(
        gqa_layer(), "x86-avx2", options=CompileOptions(quantization=options)
    )
    assert result.plan is not None
    cache_passes = [r for r in result.records if r.name == "quantize-kv-cache"]
    assert len(cache_passes) == 1 and cache_passes[0].details.layers == 1
    assert CacheCodec.of(result.model.graph).scales.keys() == {PAST, KEY, PAST_VALUE, VALUE}


def test_debug_refuses_an_int8_cache_model_by_saying_so(tmp_path):
    from qgraph.analysis.debugging import DebugError, debug_accuracy

    proto = gqa_layer()
    model = compiled(proto, [prefill(0)], tmp_path)
    with pytest.raises(DebugError, match="keeps its KV cache in int8"):
        debug_accuracy(qgraph.load(proto), model, [prefill(0)])


def test_a_rotation_of_part_of_each_head_is_refused_by_name():
    proto = gqa_layer("outside")
    for node in proto.graph.node:
        if node.op_type == "RotaryEmbedding":
            for attribute in node.attribute:
                if attribute.name == "rotary_embedding_dim":
                    attribute.i = HEAD // 2
    options = quant_options(mode="weight-only", kv_cache="int8", calib=[prefill(0)])
    with pytest.raises(QGraphError, match=f"rotates {HEAD // 2} of each key's {HEAD} channels"):
        qgraph.compile_model(proto, "x86-avx2", options=CompileOptions(quantization=options))
