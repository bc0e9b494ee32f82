"""qgraph.models.smollm2: SmolLM2-135M exported to ONNX, with real-text data, matches torch."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qgraph import models, verify
from qgraph.data import read_batches, read_info
from qgraph.graph.model_io import load
from qgraph.models import smollm2

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.torch

VOCAB = 49152


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return models.fetch("smollm2", tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def loaded():
    return smollm2.load_model(smollm2.extract(smollm2.GGUF, models.cache_dir()))


def windows(dataset) -> np.ndarray:
    return np.concatenate([batch["input_ids"] for batch in read_batches(dataset)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_datasets_have_the_stated_counts_shapes_and_dtypes(built):
    for dataset in (built.calibration, built.evaluation):
        batches = list(read_batches(dataset))
        assert len(batches) == smollm2.BATCHES == 16
        for batch in batches:
            assert list(batch) == ["input_ids"]
            assert batch["input_ids"].shape == (4, 128)
            assert batch["input_ids"].dtype == np.int64
            assert batch["input_ids"].min() >= 0 and batch["input_ids"].max() < VOCAB
        assert read_info(dataset).metric == "causal-lm" == built.metric


def test_windows_are_deterministic_and_calibration_and_evaluation_share_none(built, loaded):
    tokenizer, _ = loaded
    calibration, evaluation = windows(built.calibration), windows(built.evaluation)
    assert np.array_equal(smollm2.windows(tokenizer, held_out=False), calibration)
    assert np.array_equal(smollm2.windows(tokenizer, held_out=True), evaluation)
    rows = {row.tobytes() for row in calibration}
    assert len(rows) == len(calibration) == 64
    assert not rows & {row.tobytes() for row in evaluation}
    text = tokenizer.decode(evaluation[0])
    assert sum(word.isalpha() for word in text.split()) > 10, text


def test_the_model_has_the_stated_interface_and_one_tied_embedding(built):
    graph = load(built.model).graph
    assert [v.name for v in graph.inputs] == ["input_ids"]
    assert [v.name for v in graph.outputs] == ["logits"]
    assert [str(d) for d in graph.inputs[0].shape] == ["batch", "sequence"]
    assert [str(d) for d in graph.outputs[0].shape] == ["batch", "sequence", str(VOCAB)]
    ops = [node.op_type for node in graph]
    assert ops.count("Softmax") == 30 and ops.count("MatMul") == 30 * 9 + 1
    (embedding,) = [v for v in graph.initializers.values() if VOCAB in v.shape]
    assert {use.node.op_type for use in embedding.uses()} == {"Gather", "Transpose"}


def test_onnx_logits_match_transformers_on_a_held_out_window(built, loaded):
    _, model = loaded
    input_ids = next(read_batches(built.evaluation))["input_ids"][-2:, :100]
    with torch.no_grad():
        expected = model(torch.from_numpy(input_ids), use_cache=False).logits.numpy()
    (actual,) = verify.session(built.model).run(["logits"], {"input_ids": input_ids})
    assert actual.shape == (2, 100, VOCAB)
    error = verify.relative_error(expected, actual)
    assert error <= smollm2.LOGITS_RTOL
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_evaluation_perplexity_is_plausible_and_far_below_uniform(built):
    session = verify.session(built.model)
    losses = []
    for batch in read_batches(built.evaluation):
        (logits,) = session.run(["logits"], batch)
        targets = batch["input_ids"][:, 1:, None]
        losses.append(-np.take_along_axis(log_softmax(logits[:, :-1]), targets, -1))
    assert sum(loss.size for loss in losses) == 64 * 127
    perplexity = float(np.exp(np.concatenate(losses).mean()))
    assert 10 < perplexity < 60, perplexity
    assert perplexity < VOCAB / 500


def test_the_torchscript_export_computes_the_same_logits_from_the_same_data(built):
    legacy = models.fetch("smollm2-torchscript", built.folder.parent)
    for name in ("calibration", "evaluation"):
        assert np.array_equal(windows(legacy.folder / name), windows(built.folder / name))
    graph = load(legacy.model).graph
    assert [str(d) for d in graph.inputs[0].shape] == ["batch", "sequence"]
    assert "Constant" in {node.op_type for node in graph}
    input_ids = next(read_batches(built.evaluation))["input_ids"][:1, :64]
    (expected,) = verify.session(built.model).run(["logits"], {"input_ids": input_ids})
    (actual,) = verify.session(legacy.model).run(["logits"], {"input_ids": input_ids})
    assert actual.shape == (1, 64, VOCAB)
    assert verify.relative_error(expected, actual) <= smollm2.LOGITS_RTOL
