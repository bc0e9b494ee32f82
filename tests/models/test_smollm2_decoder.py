"""qgraph.models.smollm2_decoder: SmolLM2 with a KV cache, its data, and generation through it.

The model is taken from the zoo cache (``models.fetch``), where a first run builds it once
(about 15 minutes here, mostly the export and the build's own 4 x 64-step greedy check);
building it into a temporary folder on every run would repeat that.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from qgraph import generation, models, verify
from qgraph.cli import cli
from qgraph.data import read_batches, read_info
from qgraph.graph.model_io import load
from qgraph.models import smollm2, smollm2_decoder

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.torch

VOCAB, LAYERS = 49152, 30


@pytest.fixture(scope="module")
def built():
    return models.fetch("smollm2-decoder")


@pytest.fixture(scope="module")
def loaded():
    return smollm2.load_model(smollm2.extract(smollm2.GGUF, models.cache_dir()))


@pytest.fixture(scope="module")
def session(built):
    return verify.session(built.model, optimize=True, threads=0)


def test_the_model_has_the_cached_interface_and_its_metadata(built):
    model = load(built.model)
    graph = model.graph
    cache = ["batch", "3", "past_sequence", "64"]
    inputs = {v.name: [str(d) for d in v.shape] for v in graph.inputs}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert list(inputs)[3:] == generation.cache_names(LAYERS)
    assert all(inputs[name] == cache for name in generation.cache_names(LAYERS))
    outputs = {v.name: [str(d) for d in v.shape] for v in graph.outputs}
    assert list(outputs) == ["logits", *generation.cache_names(LAYERS, generation.present_name)]
    assert outputs["logits"] == ["batch", "sequence", str(VOCAB)]
    assert outputs["present.29.value"] == ["batch", "3", "past_sequence + sequence", "64"]
    assert model.metadata_props[generation.CONTEXT_LENGTH_KEY] == "8192"
    assert model.metadata_props[generation.EOS_TOKEN_IDS_KEY] == "2"
    ops = [node.op_type for node in graph]
    assert ops.count("Softmax") == LAYERS and ops.count("MatMul") == LAYERS * 9 + 1
    (embedding,) = [v for v in graph.initializers.values() if VOCAB in v.shape]
    assert {use.node.op_type for use in embedding.uses()} == {"Gather", "Transpose"}


def test_the_build_verified_64_greedy_steps_against_transformers(built):
    figures = json.loads((built.folder / smollm2_decoder.VERIFICATION).read_text())
    assert figures["greedy_tokens_equal"] is True
    assert figures["prompts"] == smollm2_decoder.PROMPTS
    assert all(steps <= 64 for steps in figures["steps"]) and max(figures["steps"]) == 64
    assert figures["max_logits_error"] <= smollm2.LOGITS_RTOL


def test_onnx_greedy_tokens_and_logits_equal_transformers_generate(built, loaded):
    tokenizer, model = loaded
    prompt = tokenizer("The documentation of this module explains", add_special_tokens=False)
    check = smollm2_decoder.check_greedy(built.model, model, prompt.input_ids, steps=12)
    assert check.equal and len(check.actual) == 12, (check.expected, check.actual)
    assert check.logits_error <= smollm2.LOGITS_RTOL


def test_calibration_holds_prefill_windows_then_decode_steps_after_real_prefixes(built):
    batches = list(read_batches(built.calibration))
    assert len(batches) == smollm2_decoder.PREFILL_BATCHES + smollm2_decoder.STEP_BATCHES == 16
    names = ["input_ids", "attention_mask", "position_ids", *generation.cache_names(LAYERS)]
    for batch in batches[:8]:
        assert list(batch) == names
        assert batch["input_ids"].shape == (4, 128) and batch["input_ids"].dtype == np.int64
        assert batch["past_key_values.0.key"].shape == (4, 3, 0, 64)
    for prefix, batch in zip(range(16, 122, 15), batches[8:], strict=True):
        assert batch["input_ids"].shape == (4, 1)
        assert batch["attention_mask"].shape == (4, prefix + 1) and batch["attention_mask"].all()
        assert (batch["position_ids"] == prefix).all()
        assert batch["past_key_values.29.value"].shape == (4, 3, prefix, 64)
        assert batch["past_key_values.29.value"].dtype == np.float32
    assert read_info(built.calibration).metric == "causal-lm" == built.metric


def test_cached_data_is_the_models_own_cache_of_the_real_prefix(built, loaded, session):
    """A decode step after the stored cache gives the logits of the whole prefix run afresh."""
    tokenizer, _ = loaded
    windows = smollm2.windows(tokenizer, held_out=False)
    step = list(read_batches(built.calibration))[9]  # the second decode batch: P = 31
    rows = windows[36:40, :32]
    assert np.array_equal(step["input_ids"], rows[:, 31:])
    (cached,) = session.run(["logits"], step)
    (fresh,) = session.run(["logits"], smollm2_decoder.feeds(rows, empty(session, batch=4)))
    assert verify.relative_error(fresh[:, -1:], cached) <= smollm2.LOGITS_RTOL


def test_evaluation_holds_held_out_windows_then_continuations(built, loaded):
    tokenizer, _ = loaded
    windows = smollm2.windows(tokenizer, held_out=True)
    batches = list(read_batches(built.evaluation))
    prefill = np.concatenate([b["input_ids"] for b in batches[:8]])
    assert np.array_equal(prefill, windows[:32])
    for k, (prefix, batch) in enumerate(zip(range(16, 122, 15), batches[8:], strict=True)):
        assert np.array_equal(batch["input_ids"], windows[32 + 4 * k : 36 + 4 * k, prefix:])
        assert batch["past_key_values.0.key"].shape == (4, 3, prefix, 64)
    calibration = {r.tobytes() for b in read_batches(built.calibration) for r in b["input_ids"]}
    assert not calibration & {row.tobytes() for row in prefill}
    assert read_info(built.evaluation).metric == "causal-lm"


def test_a_left_padded_row_computes_what_it_computes_alone(session):
    ids = np.arange(100, 110, dtype=np.int64)
    alone = smollm2_decoder.feeds(ids[None, 4:], empty(session))
    padded = smollm2_decoder.feeds(np.stack([ids, ids]), empty(session, batch=2))
    padded["attention_mask"][1, :4] = 0
    padded["position_ids"][1] = np.maximum(np.arange(-4, 6), 0)
    (expected,) = session.run(["logits"], alone)
    (actual,) = session.run(["logits"], padded)
    assert verify.relative_error(expected[0], actual[1, 4:]) <= smollm2.LOGITS_RTOL


def test_the_tokenizer_file_encodes_as_transformers_does(built, loaded):
    pytest.importorskip("tokenizers")
    tokenizer, _ = loaded
    ours = generation.Tokenizer(built.folder / generation.TOKENIZER_FILE)
    text = next(smollm2_decoder.corpus.paragraphs(held_out=True))
    expected = tokenizer(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == expected
    assert ours.decode(expected) == tokenizer.decode(expected)
    assert ours.vocab_size == VOCAB


def test_qgraph_generate_runs_the_zoo_decoder(built):
    pytest.importorskip("tokenizers")
    result = CliRunner().invoke(
        cli, ["generate", str(built.model), "--prompt", "The module", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The module") and len(result.stdout) > len("The module\n")
    assert "prefill 2 tokens" in result.stderr and "decode 3 tokens" in result.stderr


def empty(session, batch: int = 1) -> list[np.ndarray]:
    return smollm2_decoder.empty_cache(session, batch)


@pytest.mark.slow
def test_a_static_compile_keeps_the_cache_interface_and_generates(built, tmp_path):
    """Minutes: a W8A8 compile on the recipe's calibration data (prefill batches with an empty
    cache, decode steps after cached prefixes) keeps the cache's inputs and outputs, now
    written in place by GroupQueryAttention; then generation through it."""
    compiled = tmp_path / "w8a8.onnx"
    result = CliRunner().invoke(
        cli, ["compile", str(built.model), "--calib", str(built.calibration), "--budget",
              "none", "-o", str(compiled)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    float_session, quantized = verify.session(built.model), verify.session(compiled)
    for side in ("get_inputs", "get_outputs"):
        expected = [(v.name, v.type, v.shape) for v in getattr(float_session, side)()]
        assert [(v.name, v.type, v.shape) for v in getattr(quantized, side)()] == expected
    decoder = generation.Decoder(compiled)
    fused = generation.CacheLayout.IN_PLACE  # the attention fused into GroupQueryAttention
    float_interface = generation.Decoder(built.model).interface
    assert decoder.interface == dataclasses.replace(float_interface, cache_layout=fused)
    assert len(generation.generate(decoder, [504, 3464], 8, stop_ids=()).tokens) == 8
