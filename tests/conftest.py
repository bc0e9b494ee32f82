"""Shared fixtures: small hand-built ONNX models, a runner for their outputs, the arm64 sysroot."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

from qgraph.testing import emulation

ort.set_default_logger_severity(4)

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    # CI runs the same examples every time, so a red run is the change's, not a new draw's;
    # developers' runs keep drawing new ones (and replay their failures from .hypothesis/).
    settings.load_profile("ci")

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
    """The arm64 sysroot (``python -m qgraph.testing.emulation setup``); a skip saying why where
    there is none, a failure where ``QGRAPH_ARM64_REQUIRED`` is set (CI)."""
    try:
        return emulation.find()
    except emulation.EmulationUnavailable as why:
        if os.environ.get("QGRAPH_ARM64_REQUIRED"):
            pytest.fail(f"QGRAPH_ARM64_REQUIRED is set, but {why}")
        pytest.skip(str(why))


ToyDecoderFactory = Callable[..., tuple[str, str]]


@pytest.fixture(scope="session")
def toy_decoder() -> ToyDecoderFactory:
    """``toy_decoder(folder, vocab=7, context=16, tokenizer_vocab=vocab)`` writes
    ``decoder.onnx`` and ``tokenizer.json`` into ``folder`` and returns their paths.

    The decoder has qgraph.generation's interface (one layer, one head of one channel, float32
    cache) and a rule that only a cache fed back right follows: its cache holds every token
    so far, and the next token after each position is (sum of the tokens up to it) mod vocab
    (logits 10 there, 0 elsewhere). The tokenizer is a word-level one whose token ``i`` is the
    word ``w{i}``, split on whitespace.
    """
    import json

    def write(folder, vocab: int = 7, context: int = 16, tokenizer_vocab: int | None = None):
        cache = ["batch", 1, "past", 1]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache),
        ]
        grown = ["batch", 1, "past + sequence", 1]
        outputs = [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "sequence", vocab]
            ),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, grown),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, grown),
        ]
        constants = {
            "axes13": np.array([1, 3], np.int64),
            "axis2": np.array(2, np.int64),
            "axes2": np.array([2], np.int64),
            "vocab": np.array(vocab, np.float32),
            "depth": np.array(vocab, np.int64),
            "onoff": np.array([0, 10], np.float32),
        }
        nodes = [
            helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["ids", "axes13"], ["new"]),
            helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
            helper.make_node(
                "Concat", ["past_key_values.0.value", "new"], ["present.0.value"], axis=2
            ),
            helper.make_node("ReduceSum", ["past_key_values.0.key", "axes2"], ["before"]),
            helper.make_node("CumSum", ["new", "axis2"], ["running"]),
            helper.make_node("Add", ["running", "before"], ["sums"]),
            helper.make_node("Squeeze", ["sums", "axes13"], ["flat"]),
            helper.make_node("Mod", ["flat", "vocab"], ["rest"], fmod=1),
            helper.make_node("Cast", ["rest"], ["next"], to=TensorProto.INT64),
            helper.make_node("OneHot", ["next", "depth", "onoff"], ["logits"]),
        ]
        graph = helper.make_graph(
            nodes, "toy-decoder", inputs, outputs,
            [numpy_helper.from_array(value, name) for name, value in constants.items()],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        helper.set_model_props(
            model,
            {
                "qgraph.generation.context_length": str(context),
                "qgraph.generation.eos_token_ids": "",
            },
        )
        words = {f"w{i}": i for i in range(tokenizer_vocab or vocab)}
        tokenizer = {
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"},
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "decoder": None,
        }
        paths = (f"{folder}/decoder.onnx", f"{folder}/tokenizer.json")
        onnx.save(model, paths[0])
        with open(paths[1], "w") as file:
            json.dump(tokenizer, file)
        return paths

    return write
