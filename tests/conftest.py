"""Shared fixtures: small hand-built ONNX models, a runner for their outputs, the arm64 sysroot."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import emulation

ort.set_default_logger_severity(4)

ModelFactory = Callable[..., onnx.ModelProto]


def _value_info(name: str, shape: Sequence[int | str] | None, dtype: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture
def make_model() -> ModelFactory:
    """``make_model(nodes, inputs={name: shape}, outputs={name: shape}, initializers={...})``.

    Float32 tensors unless ``dtype`` says otherwise; opset 17 unless ``opset``.
    """

    def build(
        nodes: Sequence[onnx.NodeProto],
        inputs: dict[str, Sequence[int | str] | None],
        outputs: dict[str, Sequence[int | str] | None],
        initializers: dict[str, np.ndarray] | None = None,
        *,
        dtype: int = TensorProto.FLOAT,
        opset: int = 17,
        ir_version: int = 10,
        extra_opsets: dict[str, int] | None = None,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            list(nodes),
            "test",
            [_value_info(n, s, dtype) for n, s in inputs.items()],
            [_value_info(n, s, dtype) for n, s in outputs.items()],
            [numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
        )
        opsets = [helper.make_opsetid("", opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)

    return build


@pytest.fixture
def small_model(make_model: ModelFactory) -> onnx.ModelProto:
    """y = Relu(x @ W + b), x [2, 4]: a valid model with 28 parameters."""
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["z"], name="add"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        {"x": [2, 4]},
        {"y": [2, 6]},
        {"W": rng.normal(size=(4, 6)).astype(np.float32), "b": np.ones(6, np.float32)},
    )


@pytest.fixture
def random_feeds() -> Callable[[onnx.ModelProto], dict[str, np.ndarray]]:
    """Seeded float32 normal inputs for every graph input of a model with static shapes."""

    def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        initializers = {i.name for i in model.graph.initializer}
        result = {}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            result[value.name] = rng.normal(size=shape).astype(np.float32)
        return result

    return feeds


@pytest.fixture
def output_sqnr(tmp_path) -> Callable[..., float]:
    """``output_sqnr(zoo_model, **flags)``: the held-out output SQNR (dB) of ``zoo_model``
    compiled for x86-avx2 with its calibration data and the quantization ``flags``."""
    import qgraph
    from qgraph.evaluation import evaluate

    def sqnr(zoo_model, **flags) -> float:
        output = tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx"
        options = qgraph.CompileOptions(
            quantization=qgraph.quant_options(calib=str(zoo_model.calibration), **flags)
        )
        qgraph.compile_model(zoo_model.model, "x86-avx2", output=output, options=options)
        evaluation = evaluate(zoo_model.model, output, zoo_model.evaluation, runs=1)
        return evaluation.figures["output.sqnr_db"]

    return sqnr


@pytest.fixture(scope="session")
def sysroot() -> emulation.Sysroot:
    """The arm64 sysroot (``python -m qgraph.emulation setup``); a skip saying why where there
    is none, a failure where ``QGRAPH_ARM64_REQUIRED`` is set (CI)."""
    try:
        return emulation.find()
    except emulation.EmulationUnavailable as why:
        if os.environ.get("QGRAPH_ARM64_REQUIRED"):
            pytest.fail(f"QGRAPH_ARM64_REQUIRED is set, but {why}")
        pytest.skip(str(why))
