"""qgraph.evaluation: each metric gives the known answer on constructed outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from qgraph.evaluation import (
    CausalLMQuality,
    EmbeddingSimilarity,
    EvaluationError,
    OutputFidelity,
    TopOneAgreement,
    evaluate,
    evaluation_session,
    reference_run,
)

RNG = np.random.default_rng(0)


def test_top1_counts_flipped_argmaxes():
    ref = RNG.normal(size=(40, 5)).astype(np.float32)
    cand = ref.copy()
    flipped = [3, 17, 31]
    for row in flipped:
        cand[row, ref[row].argmax()] = ref[row].min() - 1
    metric = TopOneAgreement()
    metric.update({}, {"y": ref[:20]}, {"y": cand[:20]})
    metric.update({}, {"y": ref[20:]}, {"y": cand[20:]})
    assert metric.result() == {"top1_agreement": 37 / 40, "samples": 40}


def test_embedding_rotated_by_a_known_angle():
    angle = 0.3
    ref = np.zeros((6, 4))
    ref[np.arange(6), np.arange(6) % 4] = 1.0
    ref[:, 3] += np.linspace(0, 0.5, 6)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    metric = EmbeddingSimilarity()
    metric.update({}, {"e": ref}, {"e": 3.0 * ref @ rotation.T})
    result = metric.result()
    cosines = np.sum(
        ref
        / np.linalg.norm(ref, axis=1, keepdims=True)
        * ((ref @ rotation.T) / np.linalg.norm(ref, axis=1, keepdims=True)),
        axis=1,
    )
    assert result["mean_cosine"] == pytest.approx(cosines.mean())
    assert result["min_cosine"] == pytest.approx(cosines.min())
    assert result["neighbour_agreement"] == 1.0, "a rotation keeps every neighbour"


def test_embedding_neighbours_that_swap_are_counted():
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    cand = ref[[0, 2, 1, 3]]  # samples 1 and 2 exchange places
    metric = EmbeddingSimilarity()
    metric.update({}, {"e": ref}, {"e": cand})
    assert metric.result()["neighbour_agreement"] == 0.0


def test_causal_lm_uniform_logits_have_the_vocabulary_as_perplexity():
    vocab = 50
    ids = RNG.integers(0, vocab, size=(2, 9))
    logits = np.zeros((2, 9, vocab), np.float32)
    metric = CausalLMQuality()
    metric.update({"input_ids": ids}, {"logits": logits}, {"logits": logits + 7.0})
    result = metric.result()
    assert result["perplexity_reference"] == pytest.approx(vocab)
    assert result["perplexity_ratio"] == pytest.approx(1.0)
    assert result["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["tokens"] == 16


def test_causal_lm_known_distributions():
    # One prediction (position 0 predicts token 1; the last position predicts nothing).
    ids = np.array([[0, 1]])
    ref = np.log(np.array([[[0.8, 0.2], [0.5, 0.5]]]))
    cand = np.log(np.array([[[0.1, 0.9], [0.5, 0.5]]]))
    metric = CausalLMQuality()
    metric.update({"input_ids": ids}, {"logits": ref}, {"logits": cand})
    result = metric.result()
    assert result["perplexity_reference"] == pytest.approx(1 / 0.2)
    assert result["perplexity_candidate"] == pytest.approx(1 / 0.9)
    assert result["mean_kl"] == pytest.approx(0.8 * math.log(0.8 / 0.1) + 0.2 * math.log(0.2 / 0.9))
    assert result["next_token_agreement"] == 0.0
    assert result["tokens"] == 1


def test_causal_lm_needs_input_ids():
    with pytest.raises(EvaluationError, match="input_ids"):
        CausalLMQuality().update({}, {"l": np.zeros((1, 2, 3))}, {"l": np.zeros((1, 2, 3))})


def test_generic_sqnr_of_known_noise():
    ref = RNG.normal(size=1000)
    noise = RNG.normal(size=1000)
    noise *= 0.01 * np.linalg.norm(ref) / np.linalg.norm(noise)
    metric = OutputFidelity()
    metric.update({}, {"y": ref[:600]}, {"y": ref[:600] + noise[:600]})
    metric.update({}, {"y": ref[600:]}, {"y": ref[600:] + noise[600:]})
    result = metric.result()
    assert result["y.sqnr_db"] == pytest.approx(40.0)
    assert result["y.cosine"] == pytest.approx(
        np.dot(ref, ref + noise) / np.linalg.norm(ref) / np.linalg.norm(ref + noise)
    )


def _scaled(path, factor: float) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor("k", onnx.TensorProto.FLOAT, [], [factor])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path
    )


def test_evaluate_end_to_end_gives_the_sqnr_of_a_known_scaling(tmp_path):
    _scaled(tmp_path / "ref.onnx", 1.0)
    _scaled(tmp_path / "cand.onnx", 1.01)
    batches = [{"x": RNG.normal(size=(4, 8)).astype(np.float32)} for _ in range(3)]
    evaluation = evaluate(tmp_path / "ref.onnx", tmp_path / "cand.onnx", batches, runs=3)
    assert evaluation.metric == "generic" and evaluation.batches == 3
    assert evaluation.figures["y.sqnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert evaluation.latency is not None and evaluation.latency.runs == 3
    assert evaluation.reference_bytes == (tmp_path / "ref.onnx").stat().st_size
    with pytest.raises(EvaluationError, match="unknown metric 'accuracy'"):
        evaluate(tmp_path / "ref.onnx", tmp_path / "cand.onnx", batches, metric="accuracy")


def test_evaluate_runs_both_models_at_the_threads_asked(tmp_path):
    _scaled(tmp_path / "ref.onnx", 1.0)
    every_core = evaluation_session(tmp_path / "ref.onnx", threads=0).session
    assert every_core.get_session_options().intra_op_num_threads == 0
    batches = [{"x": RNG.normal(size=(4, 8)).astype(np.float32)}]
    evaluation = evaluate(
        tmp_path / "ref.onnx", tmp_path / "ref.onnx", batches, runs=2, threads=(0, 1)
    )
    assert [latency.threads for latency in evaluation.latencies] == [0, 1]
    data = evaluation.to_json()
    assert data["latency"]["threads"] == 0 and [t["threads"] for t in data["latencies"]] == [0, 1]
    assert all(t["speedup"] > 0 for t in data["latencies"])
    untimed = evaluate(tmp_path / "ref.onnx", tmp_path / "ref.onnx", batches, runs=0)
    assert untimed.latency is None and untimed.to_json()["latency"] is None


def test_stored_reference_outputs_give_the_figures_of_a_fresh_run(tmp_path):
    _scaled(tmp_path / "ref.onnx", 1.0)
    _scaled(tmp_path / "cand.onnx", 1.01)
    batches = [{"x": RNG.normal(size=(4, 8)).astype(np.float32)} for _ in range(3)]
    stored = reference_run(tmp_path / "ref.onnx", batches)
    fresh = evaluate(tmp_path / "ref.onnx", tmp_path / "cand.onnx", batches, runs=0)
    read = evaluate(
        tmp_path / "ref.onnx", tmp_path / "cand.onnx", batches, runs=0, reference_outputs=stored
    )
    assert read.figures == fresh.figures
    shifted = [{"y": batch["y"] * 1.01} for batch in stored]
    against = evaluate(
        tmp_path / "ref.onnx", tmp_path / "ref.onnx", batches, runs=0, reference_outputs=shifted
    )
    expected = 10 * math.log10(1.01**2 / 0.01**2)  # the stored outputs are now the signal
    assert against.figures["y.sqnr_db"] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(EvaluationError, match="2 stored reference outputs for 3 batches"):
        evaluate(
            tmp_path / "ref.onnx",
            tmp_path / "cand.onnx",
            batches,
            runs=0,
            reference_outputs=stored[:2],
        )
