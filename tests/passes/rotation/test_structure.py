"""Rotation's structure finders, on the reference transformers: the residual stream (or why
there is none to rotate), each attention head region, each MLP down projection."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import qgraph
from qgraph import models
from qgraph.options import CompileOptions
from qgraph.passes.rotation.structure import head_regions, mlp_inputs, residual_streams

HIDDEN, HEAD_DIM = 256, 64
BEFORE_ROTATION = CompileOptions(skip_passes=frozenset({"runtime-fusion"}))
"""The float rewrites rotation sees: the runtime's fused and unfused forms come after it."""


def _as_rotation_sees_it(name: str) -> ir.Model:
    return qgraph.compile_model(models.fetch(name).model, "x86-avx2", options=BEFORE_ROTATION).model


@pytest.fixture(scope="module")
def decoder() -> ir.Model:
    """The reference decoder (pre-RMS-norm, SwiGLU), compiled in float as rotation sees it."""
    return _as_rotation_sees_it("reference-decoder")


@pytest.fixture(scope="module")
def encoder() -> ir.Model:
    """The reference encoder (post-LayerNorm), compiled in float as rotation sees it."""
    return _as_rotation_sees_it("reference-encoder")


def test_the_decoders_residual_stream_has_its_two_norms_and_two_adds(decoder):
    (stream,) = residual_streams(decoder.graph)
    assert stream.width == HIDDEN
    assert [norm.op_type for norm in stream.norms] == ["SimplifiedLayerNormalization"] * 2
    assert [add.op_type for add, _ in stream.adds] == ["Add", "Add"]
    assert stream.embedding is None  # the decoder reads hidden states, not token ids


def test_a_layer_norm_stream_is_declined_with_the_reason(encoder):
    reason = residual_streams(encoder.graph)
    assert isinstance(reason, str) and "LayerNormalization, which subtracts the mean" in reason


@pytest.mark.parametrize("fixture", ["decoder", "encoder"])
def test_the_head_region_runs_from_the_value_to_the_output_projection(request, fixture):
    (region,) = head_regions(request.getfixturevalue(fixture).graph)
    assert region.value_projection.name == "attn/v_proj/MatMul"
    assert region.output_projection.name == "attn/o_proj/MatMul"
    assert region.head_dim == HEAD_DIM


@pytest.mark.parametrize(("fixture", "down"), [("decoder", "mlp"), ("encoder", "ffn")])
def test_the_mlp_input_is_its_down_projection(request, fixture, down):
    graph = request.getfixturevalue(fixture).graph
    assert [node.name for node in mlp_inputs(graph)] == [f"{down}/down_proj/MatMul"]
