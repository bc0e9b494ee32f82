"""Rotation keeps the float function, spreads outlier channels, and helps quantization.

Float equivalence. A rotated model computes the same function in another basis: every weight
``Q^T B`` (or ``B Q``) is rounded to float32 once from float64, and every float32 op then
rounds as it did before, on values of the same size (``||x Q|| = ||x||``). So the rotated
model's error against exact arithmetic is of the same size as the original's, and the two
differ by at most the sum of both: ``verify.FLOAT32_RTOL`` (~170 roundings on a path) for the
one-block reference decoder and hand-built graphs. SmolLM2's float32 logits are off the exact
ones by up to ~5e-5 of the largest logit (``qgraph.models.smollm2``: massive activations
amplify rounding), so it gets twice that, its ``LOGITS_RTOL`` = 1e-4, tighter than the
issue's 1e-3.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.inspection import summarize
from qgraph.passes.rotation import RotationPass, RotationReport
from qgraph.passes.rotation.structure import RMS_NORMS

VOCABULARY, WIDTH, HIDDEN = 200, 48, 80
"""A tiny tied-embedding language model: width 48 = 12 x 4 (Hadamard), MLP 80 = 20 x 4; a
table of 200 x 48 is over canonicalize's constant-folding limit, so Transpose(E) stays."""


def float_compiled(model) -> ir.Model:
    options = qgraph.CompileOptions(skip_passes=frozenset({"runtime-fusion"}))
    return qgraph.compile_model(model, "x86-avx2", options=options).model


def rotate(model: ir.Model, seed: int = 0) -> tuple[ir.Model, RotationReport]:
    copy = ir.from_proto(ir.to_proto(model))
    result = RotationPass(seed)(copy)
    return result.model, result.details


def assert_same_function(before: ir.Model, after: ir.Model, batches, rtol=None) -> None:
    for feeds in batches:
        mismatches = verify.compare(verify.run(before, feeds), verify.run(after, feeds), rtol)
        assert not mismatches, mismatches


def rms_norm_nodes(x: str, gamma: str, out: str) -> list:
    return [
        helper.make_node("Mul", [x, x], [f"{out}.sq"]),
        helper.make_node("ReduceMean", [f"{out}.sq"], [f"{out}.mean"], axes=[-1]),
        helper.make_node("Add", [f"{out}.mean", "eps"], [f"{out}.var"]),
        helper.make_node("Sqrt", [f"{out}.var"], [f"{out}.std"]),
        helper.make_node("Reciprocal", [f"{out}.std"], [f"{out}.inv"]),
        helper.make_node("Mul", [x, f"{out}.inv"], [f"{out}.normed"]),
        helper.make_node("Mul", [f"{out}.normed", gamma], [out]),
    ]


def tied_language_model(make_model):
    """ids -> E[ids] -> x + down(silu(RMS(x) Wg) * RMS(x) Wu) -> RMS(.) E^T (tied head)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x0"], name="embed"),
        *rms_norm_nodes("x0", "g1", "n1"),
        helper.make_node("MatMul", ["n1", "Wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["n1", "Wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["h"]),
        helper.make_node("MatMul", ["h", "Wd"], ["mlp"], name="down_proj"),
        helper.make_node("Add", ["x0", "mlp"], ["x1"], name="residual"),
        *rms_norm_nodes("x1", "gf", "nf"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["nf", "Et"], ["logits"], name="lm_head"),
    ]
    gamma = 1 + 0.1 * rng.standard_normal(WIDTH)
    gamma[[3, 17]] = 30.0
    initializers = {
        "E": rng.standard_normal((VOCABULARY, WIDTH)),
        "g1": gamma,
        "gf": 1 + 0.1 * rng.standard_normal(WIDTH),
        "eps": np.array(1e-6),
        "Wg": rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH),
        "Wu": rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH),
        "Wd": rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN),
    }
    initializers = {k: v.astype(np.float32) for k, v in initializers.items()}
    proto = make_model(nodes, {"ids": [2, 7]}, {"logits": [2, 7, VOCABULARY]}, initializers)
    proto.graph.input[0].type.tensor_type.elem_type = 7  # int64 token ids
    return proto


def token_batches(count: int = 3) -> list[dict]:
    rng = np.random.default_rng(4)
    return [{"ids": rng.integers(0, VOCABULARY, (2, 7))} for _ in range(count)]


def test_a_tied_language_model_keeps_its_function_and_its_tie(make_model):
    model = float_compiled(tied_language_model(make_model))
    rotated, report = rotate(model)
    assert [a.name for a in report.applied] == ["R1", "R4"]
    assert "tied 'lm_head'" in report.applied[0].online
    assert_same_function(model, rotated, token_batches())
    gather = next(node for node in rotated.graph if node.op_type == "Gather")
    transpose = next(node for node in rotated.graph if node.op_type == "Transpose")
    assert gather.inputs[0] is transpose.inputs[0], "one embedding table, still tied"


def test_norms_keep_no_gamma(make_model):
    model = float_compiled(tied_language_model(make_model))
    rotated, _ = rotate(model)
    norms = [node for node in rotated.graph if node.op_type in RMS_NORMS]
    assert len(norms) == 2
    for norm in norms:
        assert np.array_equal(norm.inputs[1].const_value.numpy(), np.ones(WIDTH, np.float32))


def test_rotation_spreads_the_outlier_channels(make_model):
    """gamma's two channels at 30x make the MLP input's largest channel ~30x its typical one;
    after R1 every channel carries a mix of all, so max / median channel range drops below 3."""
    model = float_compiled(tied_language_model(make_model))
    rotated, _ = rotate(model)
    spread = {}
    for name, candidate in (("before", model), ("after", rotated)):
        copy = ir.from_proto(ir.to_proto(candidate))
        gate = next(node for node in copy.graph if node.name == "gate_proj")
        verify.expose_values(copy, [gate.inputs[0].name])
        ranges = np.concatenate(
            [
                np.abs(verify.run(copy, b)[gate.inputs[0].name]).reshape(-1, WIDTH)
                for b in token_batches()
            ]
        ).max(0)
        spread[name] = ranges.max() / np.median(ranges)
    assert spread["before"] > 10 and spread["after"] < 3, spread


def test_the_same_seed_gives_the_same_model(make_model):
    model = float_compiled(tied_language_model(make_model))
    weights = {}
    for seed in (0, 0, 1):
        rotated, report = rotate(model, seed)
        gate = next(node for node in rotated.graph if node.name == "gate_proj")
        weights.setdefault(seed, []).append(gate.inputs[1].const_value.numpy())
        assert report.seed == seed
    assert np.array_equal(weights[0][0], weights[0][1])
    assert not np.allclose(weights[0][0], weights[1][0])


def test_a_stream_read_by_anything_else_is_left_with_the_reason(make_model):
    proto = tied_language_model(make_model)
    proto.graph.node.append(helper.make_node("Relu", ["x1"], ["spy"], name="spy"))
    proto.graph.output.append(helper.make_tensor_value_info("spy", 1, [2, 7, WIDTH]))
    model = float_compiled(proto)
    rotated, report = rotate(model)
    assert "read by Relu 'spy'" in report.declined["R1"]
    assert [a.name for a in report.applied] == ["R4"]
    assert_same_function(model, rotated, token_batches())


@pytest.fixture(scope="module")
def decoder() -> models.ZooModel:
    return models.fetch("reference-decoder")


def test_the_reference_decoder_keeps_its_function(decoder):
    model = float_compiled(decoder.model)
    rotated, report = rotate(model)
    assert [a.name for a in report.applied] == ["R1", "R2", "Ro", "R4"]
    assert report.applied[1].where.endswith("head_dim 64")
    assert report.applied[2].rotation == "hadamard 1 x 2^8"
    assert report.applied[3].rotation == "random orthogonal"  # 704 = 11 x 64: no Hadamard
    assert_same_function(model, rotated, list(read_batches(decoder.evaluation))[:4])


def test_the_reference_encoder_gets_local_rotations_only():
    encoder = models.fetch("reference-encoder")
    model = float_compiled(encoder.model)
    rotated, report = rotate(model)
    assert "LayerNormalization" in report.declined["R1"]
    assert sorted(a.name for a in report.applied) == ["R2", "R4", "Ro"]
    assert_same_function(model, rotated, list(read_batches(encoder.evaluation))[:4])


def test_rotation_lifts_the_decoders_w8a8_sqnr(decoder, output_sqnr):
    """Every MatMul in 8 bits on the outlier-channel decoder: 5 dB plain; rotated, the
    activations have no outlier channel left and the output SQNR passes 30 dB."""
    plain = output_sqnr(decoder, budget="none")
    rotated = output_sqnr(decoder, budget="none", rotate=True)
    assert rotated >= 30 and rotated >= plain + 20, (plain, rotated)


@pytest.mark.parametrize(
    "flags",
    [
        {"smoothquant": "auto"},
        {"mode": "weight-only", "weight_dtype": "int4"},
        {"weight_dtype": "int4", "block_size": 32},
        {"mode": "dynamic"},
    ],
    ids=["smoothquant", "weight-only-int4", "w4a8", "dynamic"],
)
def test_rotation_composes_with_the_other_modes(decoder, flags):
    flags = {"budget": "none", "smoothquant": "none", **flags}
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=str(decoder.calibration), rotate=True, **flags)
    )
    result = qgraph.compile_model(decoder.model, "x86-avx2", options=options)
    names = [record.name for record in result.records if record.modified]
    assert "rotation" in names
    plain = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=str(decoder.calibration), **flags)
    )
    unrotated = qgraph.compile_model(decoder.model, "x86-avx2", options=plain).model
    quantized = summarize(result.model).quantized_ops
    assert quantized == summarize(unrotated).quantized_ops, "online rotations stay float"
    online = [n for n in result.model.graph if "/rotation/" in n.name and n.op_type == "MatMul"]
    assert online and all("qgraph.keep_float" in n.metadata_props for n in online)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["smollm2", "smollm2-torchscript"])
def test_smollm2_keeps_its_logits(name):
    pytest.importorskip("torch")
    zoo = models.fetch(name)
    model = float_compiled(zoo.model)
    rotated, report = rotate(model)
    assert [report.count(name) for name in ("R1", "R2", "Ro", "R4")] == [1, 30, 30, 30]
    assert report.applied[0].rotation == "randomized hadamard 36 x 2^4"
    r4 = [applied for applied in report.applied if applied.name == "R4"]
    assert {applied.rotation for applied in r4} == {"hadamard 12 x 2^7"}
    evaluation = list(itertools.islice(read_batches(zoo.evaluation), 2))
    assert_same_function(model, rotated, evaluation, rtol=models.smollm2.LOGITS_RTOL)


@pytest.mark.torch
def test_minilm_gets_local_rotations_and_keeps_its_function():
    """A post-norm encoder: LayerNorm on the stream itself, so R2 (6 layers, with the value
    bias) and R4 only; 6 layers of float32 rounding as the reference blocks, FLOAT32_RTOL."""
    pytest.importorskip("torch")
    zoo = models.fetch("minilm")
    model = float_compiled(zoo.model)
    rotated, report = rotate(model)
    assert "LayerNormalization" in report.declined["R1"]
    assert [report.count(name) for name in ("R2", "Ro", "R4")] == [6, 6, 6]
    assert {applied.folded for applied in report.applied if applied.name == "R2"} == {3}
    evaluation = list(itertools.islice(read_batches(zoo.evaluation), 2))
    assert_same_function(model, rotated, evaluation)
