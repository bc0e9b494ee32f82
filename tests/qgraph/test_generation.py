"""qgraph.generation: the prefill / decode loop, its interface checks, tokenizer and timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qgraph import generation
from qgraph.generation import Decoder, GenerationError, Sampling, Tokenizer, generate

pytest.importorskip("tokenizers")


@pytest.fixture
def toy(tmp_path, toy_decoder) -> tuple[Decoder, Tokenizer]:
    model, tokenizer = toy_decoder(tmp_path)
    return Decoder(Path(model)), Tokenizer(Path(tokenizer))


def expected_tokens(prompt: list[int], count: int, vocab: int = 7) -> list[int]:
    """The toy's rule: the next token is the sum of all tokens so far, mod the vocabulary (a
    loop that dropped the cache would repeat one token; one that fed a token twice, drift)."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(sum(tokens) % vocab)
    return tokens[len(prompt) :]


def test_the_interface_is_read_from_the_inputs_outputs_and_metadata(toy):
    decoder, _ = toy
    assert decoder.interface == generation.DecoderInterface(
        layers=1, kv_heads=1, head_dim=1, cache_dtype=np.dtype(np.float32), vocab=7,
        position_ids=True, context_length=16, eos_token_ids=(),
    )  # fmt: skip


def test_greedy_generation_feeds_the_cache_back_step_by_step(toy):
    decoder, _ = toy
    prompt = [3, 1, 5]
    result = generate(decoder, prompt, max_new_tokens=10)
    assert result.tokens == expected_tokens(prompt, 10) == [2, 4, 1, 2, 4, 1, 2, 4, 1, 2]
    assert result.decode_steps == 9
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.prefill_tokens_per_second == pytest.approx(3 / result.prefill_seconds)
    assert result.decode_tokens_per_second == pytest.approx(9 / result.decode_seconds)


def test_generation_stops_after_a_stop_token_and_keeps_logits_when_asked(toy):
    decoder, _ = toy
    prompt = [3, 1, 5]
    result = generate(decoder, prompt, 5, stop_ids=[4], keep_logits=True)
    assert result.tokens == [2, 4]
    assert [int(np.argmax(row)) for row in result.logits] == result.tokens
    assert all(row.shape == (7,) for row in result.logits)


def test_one_new_token_needs_no_decode_step(toy):
    decoder, _ = toy
    result = generate(decoder, [2], 1)
    assert result.tokens == [2] and result.decode_steps == 0
    assert np.isnan(result.decode_tokens_per_second)


def test_sampling_is_seeded_and_temperature_zero_is_greedy(toy):
    decoder, _ = toy
    greedy = generate(decoder, [5], 6).tokens
    assert generate(decoder, [5], 6, Sampling(temperature=0, seed=9)).tokens == greedy
    hot = [generate(decoder, [5], 6, Sampling(temperature=50.0, seed=s)).tokens for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]


def test_the_prompt_and_new_tokens_must_fit_the_context(toy):
    decoder, _ = toy
    with pytest.raises(GenerationError, match=r"decoder.onnx: the prompt has 17 tokens, more than "
                       r"the model's context of 16"):  # fmt: skip
        generate(decoder, [1] * 17, 1)
    with pytest.raises(GenerationError, match="12 prompt tokens and 5 new ones exceed the model's "
                       "context of 16; ask for at most 4"):  # fmt: skip
        generate(decoder, [1] * 12, 5)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generate(decoder, [], 5)
    assert len(generate(decoder, [1] * 12, 4).tokens) == 4


def test_the_tokenizer_round_trips_and_must_match_the_logits(toy, tmp_path, toy_decoder):
    decoder, tokenizer = toy
    assert tokenizer.vocab_size == 7
    assert tokenizer.encode("w3 w1  w4") == [3, 1, 4]
    assert tokenizer.decode([3, 1]) == "w3 w1"
    tokenizer.check_matches(decoder)
    (tmp_path / "other").mkdir()
    _, larger = toy_decoder(tmp_path / "other", tokenizer_vocab=9)
    with pytest.raises(GenerationError, match=r"tokenizer.json: the tokenizer has 9 tokens but "
                       r".*decoder.onnx's logits have 7"):  # fmt: skip
        Tokenizer(Path(larger)).check_matches(decoder)


def test_a_model_without_a_kv_cache_is_refused_by_name(tmp_path, small_model):
    import onnx

    onnx.save(small_model, tmp_path / "plain.onnx")
    with pytest.raises(GenerationError, match=r"plain.onnx: the model has no KV cache"):
        Decoder(tmp_path / "plain.onnx")


def test_the_default_tokenizer_is_beside_the_model_else_the_zoo_decoders(tmp_path):
    zoo = tmp_path / "zoo"
    assert generation.default_tokenizer(tmp_path / "q.onnx", zoo) == zoo / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert generation.default_tokenizer(tmp_path / "q.onnx", zoo) == tmp_path / "tokenizer.json"


def test_a_missing_tokenizers_package_is_named_with_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GenerationError, match=r"needs the 'tokenizers' package: pip install "
                       r"'qgraph\[generate\]'"):  # fmt: skip
        Tokenizer(tmp_path / "tokenizer.json")


def test_a_past_without_its_present_is_refused_by_name(tmp_path, toy_decoder):
    import onnx

    model_path, _ = toy_decoder(tmp_path)
    model = onnx.load(model_path)
    (value,) = [output for output in model.graph.output if output.name == "present.0.value"]
    model.graph.output.remove(value)
    onnx.save(model, tmp_path / "half.onnx")
    with pytest.raises(GenerationError, match=r"half.onnx: has past_key_values inputs but no "
                       r"'present.0.value', which a KV-cache decoder needs"):  # fmt: skip
        Decoder(tmp_path / "half.onnx")


def test_a_model_that_fails_to_run_is_reported_in_one_line(toy, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    decoder, _ = toy

    def fail(*args, **kwargs):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : DequantizeLinear\nscale must be 1D")

    monkeypatch.setattr(decoder, "session", type("Session", (), {"run": staticmethod(fail)}))
    with pytest.raises(GenerationError, match=r"decoder.onnx: onnxruntime failed to run it at "
                       r"cache length 0: \[ONNXRuntimeError\] : 1 : FAIL : DequantizeLinear "
                       r"scale must be 1D$"):  # fmt: skip
        generate(decoder, [1, 2], 3)


VOCAB, WIDTH, HEADS, KV_HEADS, HEAD = 11, 8, 2, 1, 8


def attention_decoder(shape_reader: bool = False):
    """A one-layer decoder whose attention is onnxruntime's ``GroupQueryAttention`` over its
    cache, lengths from the mask as onnxruntime-genai's graphs compute them (random weights;
    ``shape_reader``: the total length is read from the past's shape instead)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = {
        "embedding": rng.standard_normal((VOCAB, WIDTH)),
        "wq": rng.standard_normal((WIDTH, HEADS * HEAD)),
        "wk": rng.standard_normal((WIDTH, KV_HEADS * HEAD)),
        "wv": rng.standard_normal((WIDTH, KV_HEADS * HEAD)),
        "wo": rng.standard_normal((HEADS * HEAD, VOCAB)),
    }
    constants = {
        "one": np.array([1], np.int64),
        "one_scalar": np.array(1, np.int64),
        "two_scalar": np.array(2, np.int64),
    }
    node = helper.make_node
    total = (
        [
            node("Shape", ["past_key_values.0.key"], ["past_shape"]),
            node("Gather", ["past_shape", "two_scalar"], ["past_length"]),
            node("Shape", ["input_ids"], ["ids_shape"]),
            node("Gather", ["ids_shape", "one_scalar"], ["new_length"]),
            node("Add", ["past_length", "new_length"], ["total"]),
        ]
        if shape_reader
        else [
            node("Shape", ["attention_mask"], ["mask_shape"]),
            node("Gather", ["mask_shape", "one_scalar"], ["total"]),
        ]
    )
    nodes = [
        node("Gather", ["embedding", "input_ids"], ["x"]),
        *(node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"),
        node("ReduceSum", ["attention_mask", "one"], ["sums"], keepdims=0),
        node("Sub", ["sums", "one"], ["last"]),
        node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        *total,
        node("Cast", ["total"], ["total_length"], to=TensorProto.INT32),
        node(
            "GroupQueryAttention",
            [
                *"qkv",
                "past_key_values.0.key",
                "past_key_values.0.value",
                "seqlens_k",
                "total_length",
            ],
            ["context", "present.0.key", "present.0.value"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV_HEADS,
        ),
        node("MatMul", ["context", "wo"], ["logits"]),
    ]
    cache = ["batch", KV_HEADS, "past", HEAD]
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "attention_decoder",
        [
            tensor("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            tensor("attention_mask", TensorProto.INT64, ["batch", "total"]),
            tensor("past_key_values.0.key", TensorProto.FLOAT, cache),
            tensor("past_key_values.0.value", TensorProto.FLOAT, cache),
        ],
        [
            tensor("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB]),
            tensor("present.0.key", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD]),
            tensor("present.0.value", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD]),
        ],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()]
        + [numpy_helper.from_array(a, n) for n, a in constants.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_a_cache_that_only_attention_updates_is_found_and_no_other():
    import qgraph

    assert generation.writes_cache_in_place(qgraph.load(attention_decoder()).graph)
    assert not generation.writes_cache_in_place(
        qgraph.load(attention_decoder(shape_reader=True)).graph
    ), "the buffer's capacity would be read as the cache's length"


def test_only_a_compile_whose_attention_updates_the_cache_stamps_it(tmp_path, toy_decoder):
    import onnx

    import qgraph

    cases = {"attention.onnx": (attention_decoder(), "in-place")}
    cases["toy.onnx"] = (onnx.load(toy_decoder(tmp_path)[0]), None)
    stamped = attention_decoder(shape_reader=True)
    onnx.helper.set_model_props(stamped, {generation.CACHE_LAYOUT_KEY: "in-place"})
    cases["reader.onnx"] = (stamped, None)
    for name, (model, layout) in cases.items():
        compiled = qgraph.compile_model(model, "x86-avx2", output=tmp_path / f"out-{name}")
        assert compiled.model.metadata_props.get(generation.CACHE_LAYOUT_KEY) == layout, name


@pytest.fixture
def attention_models(tmp_path) -> tuple[Decoder, Decoder]:
    """The attention decoder with a growing cache, and with the stamp that puts it in place."""
    import onnx

    model = attention_decoder()
    onnx.save(model, tmp_path / "growing.onnx")
    onnx.helper.set_model_props(model, {generation.CACHE_LAYOUT_KEY: "in-place"})
    onnx.save(model, tmp_path / "in_place.onnx")
    return Decoder(tmp_path / "growing.onnx"), Decoder(tmp_path / "in_place.onnx")


def test_a_cache_updated_in_place_gives_what_a_growing_cache_gives(attention_models):
    growing, in_place = attention_models
    assert growing.interface.cache_layout is generation.CacheLayout.GROWING
    assert in_place.interface.cache_layout is generation.CacheLayout.IN_PLACE
    assert isinstance(in_place.empty_cache(4), generation.InPlaceCache)
    prompt = [3, 9, 1, 4, 7]
    expected = generate(growing, prompt, 12, keep_logits=True)
    actual = generate(in_place, prompt, 12, keep_logits=True)
    assert actual.tokens == expected.tokens
    assert len(set(expected.tokens)) > 2, "the tokens depend on the cache"
    for ours, theirs in zip(actual.logits, expected.logits, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)


def test_an_in_place_cache_refuses_tokens_beyond_its_capacity(attention_models):
    _, decoder = attention_models
    cache = decoder.empty_cache(4)
    decoder.run([1, 2, 3], cache)
    with pytest.raises(GenerationError, match="the cache holds 4 tokens; 3 cached and 2 new do "
                       "not fit"):  # fmt: skip
        decoder.run([4, 5], cache)


def test_a_model_stamped_in_place_that_is_not_fails_in_one_line(tmp_path, toy_decoder):
    """The toy concatenates its cache: bound to one buffer, onnxruntime refuses the present's
    shape, and the loop says so in one line naming the model."""
    import onnx

    model = onnx.load(toy_decoder(tmp_path)[0])
    onnx.helper.set_model_props(model, {generation.CACHE_LAYOUT_KEY: "in-place"})
    onnx.save(model, tmp_path / "stamped.onnx")
    decoder = Decoder(tmp_path / "stamped.onnx")
    with pytest.raises(GenerationError, match=r"stamped.onnx: onnxruntime failed to run it at "
                       r"cache length 0: Error in execution: .* Concat node"):  # fmt: skip
        generate(decoder, [1, 2], 3)


def test_an_int8_cache_is_fed_back_in_place_as_a_growing_one_would_be(tmp_path):
    """Compiled with ``--kv-cache int8`` (weights left float), the decoder's caches are int8;
    the loop feeds them back, bound in place or grown step by step, to the same logits."""
    import onnx

    import qgraph
    from qgraph.options import CompileOptions
    from qgraph.recipe import quant_options

    rng = np.random.default_rng(4)
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
    calibration = [
        {
            "input_ids": rng.integers(0, VOCAB, (1, 6)),
            "attention_mask": np.ones((1, 6), np.int64),
            **dict.fromkeys(generation.cache_names(1), empty),
        }
        for _ in range(3)
    ]
    options = quant_options(
        mode="weight-only", kv_cache="int8", calib=calibration, exclude_op=["MatMul", "Gather"]
    )
    qgraph.compile_model(
        attention_decoder(),
        "x86-avx2",
        output=tmp_path / "in_place.onnx",
        options=CompileOptions(quantization=options),
    )
    model = onnx.load(tmp_path / "in_place.onnx")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "growing.onnx")
    in_place, growing = Decoder(tmp_path / "in_place.onnx"), Decoder(tmp_path / "growing.onnx")
    assert in_place.interface.cache_layout is generation.CacheLayout.IN_PLACE
    assert in_place.interface.cache_dtype == growing.interface.cache_dtype == np.int8
    prompt = [3, 9, 1, 4, 7]
    expected = generate(growing, prompt, 12, keep_logits=True)
    actual = generate(in_place, prompt, 12, keep_logits=True)
    assert actual.tokens == expected.tokens
    for ours, theirs in zip(actual.logits, expected.logits, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
