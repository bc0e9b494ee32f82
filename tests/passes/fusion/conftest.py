"""Fixtures for fusion tests: fuse a hand-built model and prove the function did not change."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qgraph
from qgraph import verify
from qgraph.graph.ops import qualified_op
from qgraph.passes.canonicalize import ShapeInferencePass
from qgraph.passes.fusion import FusionPass, FusionReport, RuntimeFusionPass

Fused = tuple[ir.Model, FusionReport]
MAGIKA_SCOPE = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/"


def random_inputs(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 values for every (static-shaped) graph input."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in proto.graph.initializer}
    return {
        value.name: rng.standard_normal(
            [d.dim_value for d in value.type.tensor_type.shape.dim], dtype=np.float32
        )
        for value in proto.graph.input
        if value.name not in initializers
    }


@pytest.fixture
def fuse() -> Callable[..., Fused]:
    """``fuse(proto, target=..., feeds=None, rtol=None)``: shape inference, fusion with explain,
    and a check in onnxruntime that outputs equal the original's (qgraph.verify's tolerance
    unless ``rtol``)."""

    return functools.partial(_fused, passes=(FusionPass,))


@pytest.fixture
def runtime_fuse() -> Callable[..., Fused]:
    """``fuse``, then the runtime-fusion pass; its report."""
    return functools.partial(_fused, passes=(FusionPass, RuntimeFusionPass))


def _fused(proto, target: str = "x86-avx2", feeds=None, rtol=None, *, passes) -> Fused:
    model = ShapeInferencePass()(qgraph.load(proto)).model
    for make in passes:
        result = make(qgraph.get_target(target), explain=True)(model)
    feeds = feeds if feeds is not None else random_inputs(proto)
    expected = verify.run(proto.SerializeToString(), feeds)
    mismatches = verify.compare(expected, verify.run(result.model, feeds), rtol)
    assert not mismatches, mismatches
    return result.model, result.details


def _ops(model: ir.Model) -> list[str]:
    return [qualified_op(n.domain, n.op_type) for n in model.graph]


@pytest.fixture
def ops() -> Callable[[ir.Model], list[str]]:
    """Op types in graph order (``domain::op`` outside the ONNX domain)."""
    return _ops


@pytest.fixture
def reasons() -> Callable[[FusionReport, str], list[str]]:
    """The near-miss reasons a report gives for one rule."""
    return lambda report, rule: [m.reason for m in report.near_misses if m.rule == rule]


@pytest.fixture(scope="module")
def magika_values() -> Callable[[list[str]], tuple[dict, dict]]:
    """``magika_values(names)``: the values ``MagikaV2/<name>`` of the zoo's magika and of its
    float compile (the fusion rules), on its first evaluation batch, keyed by ``name``."""
    from qgraph import models
    from qgraph.data import read_batches

    zoo = models.fetch("magika")
    compiled = qgraph.compile_model(str(zoo.model), "x86-avx2", options=qgraph.CompileOptions())
    feeds = next(iter(read_batches(zoo.evaluation)))
    models_ = (onnx.load(zoo.model), ir.to_proto(compiled.model))

    def values(names: list[str]) -> tuple[dict, dict]:
        scoped = [MAGIKA_SCOPE + name for name in names]
        original, fused = (_with_outputs(proto, scoped) for proto in models_)
        runs = tuple(verify.run(proto.SerializeToString(), feeds) for proto in (original, fused))
        return tuple({name[len(MAGIKA_SCOPE) :]: v for name, v in run.items()} for run in runs)

    return values


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return copy
