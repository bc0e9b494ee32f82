"""qgraph.models.minilm: the exported sentence embedder matches torch on real sentences."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from qgraph import CompileOptions, compile_model, data, models, quant_options, verify
from qgraph.graph.model_io import load
from qgraph.inspection import diff_models
from qgraph.kernels import runtime_kernels
from qgraph.models import minilm
from qgraph.targets import get_target

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.torch

CLS, SEP = 101, 102
TRIPLES = (
    (
        "A man is playing a guitar on stage.",
        "Someone performs a song on an acoustic guitar.",
        "The central bank raised interest rates again.",
    ),
    (
        "How do I read a text file in Python?",
        "What is the way to open and read a file with Python?",
        "My cat likes to sleep in the afternoon sun.",
    ),
    (
        "Heavy rain and cold winds are expected tomorrow.",
        "The forecast says it will be wet and chilly tomorrow.",
        "This function returns the number of items in a list.",
    ),
)
"""(anchor, paraphrase, unrelated) sentences, written for this test."""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> models.ZooModel:
    return models.fetch("minilm", tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def files() -> dict:
    return minilm.model_files()


@pytest.fixture(scope="module")
def reference(files: dict) -> torch.nn.Module:
    return minilm.load_model(files)


@pytest.fixture(scope="module")
def session(zoo: models.ZooModel):
    return verify.session(zoo.model)


@pytest.fixture(scope="module")
def triples(files: dict) -> dict[str, np.ndarray]:
    """The hand-written sentences as one batch, padded only to the longest of them."""
    sentences = [s for triple in TRIPLES for s in triple]
    (batch,), _ = minilm.tokenize(minilm.load_tokenizer(files), sentences)
    return minilm.trimmed(batch, len(sentences))


@pytest.fixture(scope="module")
def last_evaluation(zoo: models.ZooModel, session) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The last evaluation batch (the build checked the first two) and onnxruntime's output."""
    feeds = list(data.read_batches(zoo.evaluation))[-1]
    return feeds, session.run([minilm.OUTPUT], feeds)[0]


def test_the_graph_is_six_plain_bert_layers_with_dynamic_axes(zoo):
    model = load(zoo.model)
    ops = [node.op_type for node in model.graph]
    assert model.opset_imports[""] == minilm.OPSET
    assert ops.count("MatMul") == 6 * 8 and ops.count("Softmax") == 6 and ops.count("Erf") == 6
    assert ops.count("LayerNormalization") == 1 + 6 * 2
    assert not {"Constant", "IsNaN", "Where", "GatherND"} & set(ops), "exporter clutter is back"
    assert len(ops) < 250
    for value in model.graph.inputs:
        assert value.dtype == ir.DataType.INT64
        assert [str(d) for d in value.shape] == ["batch", "sequence"]
    assert [v.name for v in model.graph.inputs] == list(minilm.INPUTS)
    (output,) = model.graph.outputs
    assert output.name == minilm.OUTPUT and output.dtype == ir.DataType.FLOAT
    assert [str(d) for d in output.shape] == ["batch", "384"]


def test_sentence_selection_is_deterministic_and_held_out(zoo, files):
    """A fresh process with another hash seed selects exactly what the build wrote."""
    script = (
        "import json; from qgraph.models import minilm; print(json.dumps(minilm.sentence_split()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    calibration, evaluation = json.loads(run.stdout)
    assert (len(set(calibration)), len(set(evaluation))) == (256, 512)
    assert not set(calibration) & set(evaluation)
    assert all(6 <= len(s.split()) <= 40 for s in calibration + evaluation)
    tokenizer = minilm.load_tokenizer(files)
    for sentences, folder in ((calibration, zoo.calibration), (evaluation, zoo.evaluation)):
        expected, _ = minilm.tokenize(tokenizer, sentences)
        written = list(data.read_batches(folder))
        assert len(written) == len(expected)
        for want, got in zip(expected, written, strict=True):
            assert all(np.array_equal(want[name], got[name]) for name in minilm.INPUTS)


def test_onnxruntime_matches_torch_within_the_tolerance(
    reference, session, last_evaluation, triples
):
    feeds, ort_out = last_evaluation
    assert np.abs(ort_out - minilm.embed(reference, feeds)).max() <= minilm.TOLERANCE
    (ort_triples,) = session.run([minilm.OUTPUT], triples)
    assert ort_triples.shape == (9, 384)
    assert np.abs(ort_triples - minilm.embed(reference, triples)).max() <= minilm.TOLERANCE


def test_embeddings_are_unit_norm(last_evaluation):
    _, embeddings = last_evaluation
    assert embeddings.shape == (32, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_paraphrases_score_higher_than_unrelated_sentences(session, triples):
    (embeddings,) = session.run([minilm.OUTPUT], triples)
    for anchor, paraphrase, unrelated in embeddings.reshape(len(TRIPLES), 3, -1):
        assert anchor @ paraphrase > 0.5
        assert anchor @ paraphrase > anchor @ unrelated + 0.4


def test_datasets_have_the_stated_counts_and_shapes(zoo):
    for folder, batches in ((zoo.calibration, 8), (zoo.evaluation, 16)):
        written = list(data.read_batches(folder))
        assert len(written) == batches
        for feeds in written:
            assert sorted(feeds) == sorted(minilm.INPUTS)
            assert all(a.shape == (32, 64) and a.dtype == np.int64 for a in feeds.values())
            ids, mask = feeds["input_ids"], feeds["attention_mask"]
            lengths = mask.sum(axis=1)
            assert np.array_equal(mask, np.arange(64) < lengths[:, None])
            assert (ids[:, 0] == CLS).all() and (ids[np.arange(32), lengths - 1] == SEP).all()
            assert (ids[mask == 0] == 0).all() and (feeds["token_type_ids"] == 0).all()
        info = data.read_info(folder)
        assert info.metric == "embedding"
        assert info.description.startswith(f"{batches * 32} English sentences")


def test_a_diff_of_the_compile_states_the_counts_a_person_checks(zoo: models.ZooModel):
    quantization = quant_options(calib=str(zoo.calibration), measure=False)
    options = CompileOptions(quantization=quantization)
    compiled = compile_model(load(zoo.model), "x86-avx2", options=options).model
    diff = diff_models(load(zoo.model), compiled)
    quantized = diff.after.quantized_ops["MatMul"]
    assert 0 < quantized <= diff.after.op_histogram["MatMul"] == 48
    weights = diff.quantized_tensors[("weight", "uint8 per-channel(axis 1)")]
    assert weights == quantized, "one dequantized weight per quantized MatMul"
    activations = diff.quantized_tensors[("activation", "uint8 per-tensor")]
    inserted = diff.after.quantize_nodes - diff.before.quantize_nodes
    assert activations == inserted > 0
    assert diff.created_by_pass["fusion"] == {"com.microsoft::Gelu": 6}
    floors = {"ReduceMax": 6, "Sub": 6, "Max": 6}
    assert diff.created_by_pass["floor-softmax-logits"] == floors, "padded: masked logits"
    assert diff.size_ratio < 0.6, "the word embedding table is stored in 8 bits"
    assert runtime_kernels(compiled).complete, "every quantized MatMul an integer kernel"


def test_every_candidate_in_8_bits_for_tensorrt_passes_its_own_rules(zoo: models.ZooModel):
    """The residual Adds of a post-norm encoder: the placement puts a Q/DQ on each skip input
    the rules ask for (a compile failed on its own ``residual_inputs_quantized`` before)."""
    options = CompileOptions(quantization=quant_options(calib=str(zoo.calibration), budget="none"))
    compiled = compile_model(load(zoo.model), "tensorrt", options=options).model
    annotate_counts = diff_models(load(zoo.model), compiled).after.quantized_ops
    assert annotate_counts["MatMul"] > 0
    assert not get_target("tensorrt").check(compiled)
