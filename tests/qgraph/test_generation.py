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
