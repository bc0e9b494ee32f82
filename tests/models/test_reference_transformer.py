"""qgraph.models: the reference transformer blocks compute what their docstring says."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import models, verify
from qgraph.data import read_batches, read_info
from qgraph.graph.model_io import load, serialize
from qgraph.models.reference_transformer import (
    CALIBRATION_BATCHES,
    CALIBRATION_SEED,
    EVALUATION_BATCHES,
    build_reference_decoder,
    build_reference_encoder,
    decoder_batches,
    encoder_batches,
)

BUILDERS = [build_reference_encoder, build_reference_decoder]

# ONNX Runtime computes in float32, the references below in float64. Each float32 operation
# rounds by at most eps/2 = 6e-8 relative; a block chains a few dozen elementwise ops and dot
# products of up to 1024 terms, whose rounding errors have random signs and grow like the
# square root of their count. A few hundred roundings stay under verify.FLOAT32_RTOL = 1e-5,
# measured against the output's largest magnitude so that entries near 0 do not count as
# huge relative errors; a missing bias (std 0.02) or a wrong constant is far above it.
TOLERANCE = verify.FLOAT32_RTOL

_erf = np.vectorize(math.erf)


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy().astype(np.float64)
        for name, value in model.graph.initializers.items()
    }


def _heads(x: np.ndarray, count: int) -> np.ndarray:
    batch, sequence, _ = x.shape
    return x.reshape(batch, sequence, count, 64).transpose(0, 2, 1, 3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    batch, _, sequence, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, sequence, -1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    scores = np.where(allowed, q @ k.swapaxes(-1, -2) / math.sqrt(64), -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True) @ v


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    centered = x - x.mean(axis=-1, keepdims=True)
    return gamma * centered / np.sqrt((centered**2).mean(axis=-1, keepdims=True) + 1e-12) + beta


def encoder_reference(model: ir.Model, hidden_states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = _weights(model)

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"] + w[f"{name}.bias"]

    x = hidden_states.astype(np.float64)
    q, k, v = (_heads(linear(x, f"attn.{p}_proj"), 4) for p in "qkv")
    real_keys = mask[:, None, None, :].astype(bool)
    attended = linear(_merge_heads(_attention(q, k, v, real_keys)), "attn.o_proj")
    h = _layer_norm(x + attended, w["attn_norm.gamma"], w["attn_norm.beta"])
    up = linear(h, "ffn.up_proj")
    gelu = 0.5 * up * (1.0 + _erf(up / math.sqrt(2.0)))
    return _layer_norm(h + linear(gelu, "ffn.down_proj"), w["ffn_norm.gamma"], w["ffn_norm.beta"])


def _rms_norm(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    return gamma * x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-6)


def _rotary(x: np.ndarray) -> np.ndarray:
    """Rotate each pair of channels (i, i + 32) of head vectors [..., seq, 64] by p * w_i."""
    frequencies = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    angles = np.outer(np.arange(x.shape[-2]), frequencies)
    first, second = x[..., :32], x[..., 32:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def decoder_reference(model: ir.Model, hidden_states: np.ndarray) -> np.ndarray:
    w = _weights(model)
    x = hidden_states.astype(np.float64)
    n = _rms_norm(x, w["input_norm.gamma"])
    q = _rotary(_heads(n @ w["attn.q_proj.weight"], 4))
    k = _rotary(_heads(n @ w["attn.k_proj.weight"], 2)).repeat(2, axis=1)
    v = _heads(n @ w["attn.v_proj.weight"], 2).repeat(2, axis=1)
    causal = np.tril(np.ones((x.shape[1], x.shape[1]), dtype=bool))
    h = x + _merge_heads(_attention(q, k, v, causal)) @ w["attn.o_proj.weight"]
    m = _rms_norm(h, w["post_attention_norm.gamma"])
    gate, up = m @ w["mlp.gate_proj.weight"], m @ w["mlp.up_proj.weight"]
    return h + (gate / (1.0 + np.exp(-gate)) * up) @ w["mlp.down_proj.weight"]


def _output(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return verify.run(model, feeds)["output"]


def _random_feeds(model: ir.Model, batch: int, sequence: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + sequence)
    feeds = {"hidden_states": rng.standard_normal((batch, sequence, 256), dtype=np.float32)}
    if "attention_mask" in [value.name for value in model.graph.inputs]:
        lengths = rng.integers(1, sequence, size=batch, endpoint=True)
        feeds["attention_mask"] = (np.arange(sequence) < lengths[:, None]).astype(np.int64)
    return feeds


@pytest.mark.parametrize("build", BUILDERS)
def test_same_seed_same_model_other_seed_other_weights(build):
    assert serialize(build(0)) == serialize(build(0))
    assert serialize(build(0)) != serialize(build(1))


@pytest.mark.parametrize("build", BUILDERS)
def test_valid_model_that_runs_at_any_batch_and_sequence(build):
    model = build()
    onnx.checker.check_model(onnx.load_from_string(serialize(model)), full_check=True)
    assert [value.name for value in model.graph.outputs] == ["output"]
    for batch, sequence in [(1, 7), (3, 19)]:
        output = _output(model, _random_feeds(model, batch, sequence))
        assert output.shape == (batch, sequence, 256) and np.isfinite(output).all()


def test_encoder_matches_numpy():
    model = build_reference_encoder()
    feeds = encoder_batches(CALIBRATION_SEED, 1)[0]
    expected = encoder_reference(model, feeds["hidden_states"], feeds["attention_mask"])
    assert verify.relative_error(expected, _output(model, feeds)) <= TOLERANCE


def test_decoder_matches_numpy():
    model = build_reference_decoder()
    feeds = decoder_batches(CALIBRATION_SEED, 1)[0]
    expected = decoder_reference(model, feeds["hidden_states"])
    assert verify.relative_error(expected, _output(model, feeds)) <= TOLERANCE


# Every op of each graph, so fused forms (LayerNormalization, Gelu, RMSNormalization,
# Attention, RotaryEmbedding) cannot appear and no decomposed step can go missing.
ENCODER_OPS = {
    "MatMul": 8,  # q, k, v, scores, context, o, up, down
    "Add": 14,  # 6 biases, mask, 2 residuals, 2 x (eps, beta) in LayerNorm, 1 + erf
    "Mul": 5,  # mask * min, 2 LayerNorm gammas, 2 in GELU
    "Div": 4,  # scores / 8, 2 LayerNorm, x / sqrt(2)
    "Sub": 3,  # 1 - mask, 2 LayerNorm centerings
    "ReduceMean": 4,
    "Pow": 2,
    "Sqrt": 2,
    "Erf": 1,
    "Softmax": 1,
    "Reshape": 4,
    "Transpose": 4,
    "Unsqueeze": 1,
    "Cast": 1,
}
DECODER_OPS = {
    "MatMul": 9,  # q, k, v, scores, context, o, gate, up, down
    "Mul": 10,  # 2 x (normalize, gamma) in RMSNorm, 2 x (cos, sin) in rotary, SiLU, gate * up
    "Add": 7,  # 2 RMSNorm eps, 2 rotary sums, causal mask, 2 residuals
    "Slice": 7,  # cos, sin, 2 x 2 rotate_half halves, causal mask
    "Reshape": 6,  # q, k, v heads, 2 repeat_kv, merge
    "Transpose": 5,  # q, k, v heads, K^T, merge
    "Concat": 3,  # 2 rotate_half, the causal mask's ends
    "Div": 1,
    "Pow": 2,
    "ReduceMean": 2,
    "Sqrt": 2,
    "Reciprocal": 2,
    "Neg": 2,
    "Unsqueeze": 2,
    "Expand": 2,
    "Softmax": 1,
    "Sigmoid": 1,
    "Shape": 1,
}


@pytest.mark.parametrize(
    "build, expected",
    [(build_reference_encoder, ENCODER_OPS), (build_reference_decoder, DECODER_OPS)],
)
def test_ops_are_the_decomposed_ones(build, expected):
    assert Counter(node.op_type for node in build().graph) == expected


def test_encoder_padding_does_not_reach_real_tokens():
    model = build_reference_encoder()
    feeds = encoder_batches(CALIBRATION_SEED, 1)[0]
    padding = feeds["attention_mask"] == 0
    assert padding.any() and not padding.all()
    changed = feeds["hidden_states"].copy()
    changed[padding] = np.random.default_rng(7).normal(0.0, 10.0, changed[padding].shape)
    before = _output(model, feeds)
    after = _output(model, {**feeds, "hidden_states": changed})
    assert np.array_equal(before[~padding], after[~padding])
    assert not np.allclose(before[padding], after[padding])


def test_decoder_is_causal():
    model = build_reference_decoder()
    hidden_states = decoder_batches(CALIBRATION_SEED, 1)[0]["hidden_states"]
    changed = hidden_states.copy()
    changed[:, 20:] = np.random.default_rng(7).standard_normal(changed[:, 20:].shape)
    before = _output(model, {"hidden_states": hidden_states})
    after = _output(model, {"hidden_states": changed})
    assert np.array_equal(before[:, :20], after[:, :20])
    assert not np.allclose(before[:, 20:], after[:, 20:])


def _last_token_change_when_context_shuffled(model: ir.Model) -> float:
    hidden_states = decoder_batches(CALIBRATION_SEED, 1)[0]["hidden_states"]
    permutation = np.random.default_rng(7).permutation(hidden_states.shape[1] - 1)
    shuffled = hidden_states.copy()
    shuffled[:, :-1] = hidden_states[:, permutation]
    before = _output(model, {"hidden_states": hidden_states})[:, -1]
    after = _output(model, {"hidden_states": shuffled})[:, -1]
    return verify.relative_error(before, after)


def test_rotary_embedding_makes_outputs_depend_on_position():
    """The last token attends to every token; without positions its output would depend on
    the set of earlier tokens only, so shuffling them would change it by rounding alone."""
    model = build_reference_decoder()
    assert _last_token_change_when_context_shuffled(model) > 1e-2
    for name, value in [("rope.cos", 1.0), ("rope.sin", 0.0)]:
        table = model.graph.initializers[name]
        table.const_value = ir.tensor(
            np.full(table.const_value.numpy().shape, value, np.float32), name=name
        )
    assert _last_token_change_when_context_shuffled(model) < TOLERANCE


@pytest.mark.parametrize(
    "norm, matmuls",
    [
        ("input_norm", ["attn/q_proj/MatMul", "attn/k_proj/MatMul", "attn/v_proj/MatMul"]),
        ("post_attention_norm", ["mlp/gate_proj/MatMul", "mlp/up_proj/MatMul"]),
    ],
)
def test_decoder_activations_have_outlier_channels(norm, matmuls):
    model = build_reference_decoder()
    probe = load(serialize(model))
    inputs = {node.name: node.inputs[0] for node in probe.graph if node.name in matmuls}
    activation = inputs[matmuls[0]]
    assert len(inputs) == len(matmuls) and {*inputs.values()} == {activation}
    activation.type = ir.TensorType(ir.DataType.FLOAT)
    probe.graph.outputs.append(activation)
    batches = decoder_batches(CALIBRATION_SEED, CALIBRATION_BATCHES)
    feeds = {"hidden_states": np.concatenate([batch["hidden_states"] for batch in batches])}
    outputs = verify.run(probe, feeds)

    per_channel = np.abs(outputs[activation.name]).max(axis=(0, 1))
    ratio = per_channel / np.median(per_channel)
    outliers = np.flatnonzero(ratio > 10)
    gamma = model.graph.initializers[f"{norm}.gamma"].const_value.numpy()
    np.testing.assert_array_equal(outliers, np.flatnonzero(gamma > 10))
    assert len(outliers) == 4 and ((ratio[outliers] >= 50) & (ratio[outliers] <= 100)).all()
    assert np.delete(ratio, outliers).max() < 2
    assert 0.5 < outputs["output"].std() < 2 and np.abs(outputs["output"]).max() < 20


def test_encoder_rows_hold_8_to_32_tokens_then_padding():
    for batch in encoder_batches(CALIBRATION_SEED, CALIBRATION_BATCHES):
        mask = batch["attention_mask"]
        lengths = mask.sum(axis=1)
        assert mask.dtype == np.int64 and ((lengths >= 8) & (lengths <= 32)).all()
        np.testing.assert_array_equal(mask, np.arange(32) < lengths[:, None])


@pytest.mark.parametrize(
    "name, inputs",
    [
        ("reference-encoder", {"hidden_states", "attention_mask"}),
        ("reference-decoder", {"hidden_states"}),
    ],
)
def test_fetch_builds_model_and_datasets(tmp_path, name, inputs):
    zoo_model = models.fetch(name, tmp_path)
    calibration = list(read_batches(zoo_model.calibration))
    evaluation = list(read_batches(zoo_model.evaluation))
    assert (len(calibration), len(evaluation)) == (CALIBRATION_BATCHES, EVALUATION_BATCHES)
    assert zoo_model.metric == read_info(zoo_model.evaluation).metric == "generic"
    for batch in calibration + evaluation:
        assert set(batch) == inputs
        assert batch["hidden_states"].shape == (4, 32, 256)
        assert batch["hidden_states"].dtype == np.float32
    assert not np.array_equal(calibration[0]["hidden_states"], evaluation[0]["hidden_states"])
    output = _output(load(zoo_model.model), calibration[0])
    assert output.shape == (4, 32, 256) and np.isfinite(output).all()
