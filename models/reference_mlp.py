"""An MLP classifier served one request at a time, with seeded weights, built with onnx_ir.

features [batch, 1024] -> three hidden layers (Linear + Relu: 1024 -> 2048 -> 2048 -> 1024)
-> Linear -> logits [batch, 10]. Each Linear is a ``MatMul`` by an [in, out] weight followed
by an ``Add`` of its bias, as torch's dynamo exporter writes ``nn.Linear``, so that fusion has
work to do.

The data are 10 classes, each a Gaussian cluster: ``x = c_k + SPREAD * n`` with centres
``c_k`` and noise ``n`` standard normal in 1024 dimensions. The hidden layers are random
features (He initialisation: normal with std sqrt(2 / fan_in), small biases); the classifier is
fitted to them by ridge regression on one-hot targets of ``TRAINING_SAMPLES`` seeded samples,

    W = (H^T H + lambda I)^-1 H^T Y,    H = [h, 1] (the bias as a last row of W),

so the logits separate the classes with margins a real classifier has, rather than the
near-ties of a random one, and top-1 agreement measures quantization, not coin flips.

Why this shape is the README's example: at batch 1 each layer is a matrix-vector product, so
its time is the time to read the weights (8-16 MB each in float32, far beyond the caches).
8-bit weights read 4x fewer bytes, so the int8 model is faster on every x86 host, with or
without VNNI. A convolutional network (``reference-cnn``) is compute-bound instead: its int8
speed-up needs VNNI, and on an AVX2-only host qgraph's plan keeps its Convs in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.data import DatasetInfo, write_dataset
from qgraph.graph.model_io import save
from qgraph.models import Recipe

OPSET = 17
FEATURES = 1024
LAYERS = (2048, 2048, 1024)
CLASSES = 10
BIAS_STD = 0.02
SPREAD = 1.0
TRAINING_SAMPLES = 4096
RIDGE = 1e-2
"""lambda, relative to the mean of ``diag(H^T H)``."""
CALIBRATION_SAMPLES = 32
EVALUATION_SAMPLES = 256
CENTRES_SEED, TRAINING_SEED, CALIBRATION_SEED, EVALUATION_SEED = 3, 4, 1, 2


def _linear(tape: ir.tape.Tape, x: ir.Value, name: str, weight: np.ndarray, bias: np.ndarray):
    """``x @ W + b`` as a MatMul and an Add, W in [in, out] layout."""
    w = tape.initializer(ir.tensor(weight.astype(np.float32), name=f"{name}.weight"))
    b = tape.initializer(ir.tensor(bias.astype(np.float32), name=f"{name}.bias"))
    product = tape.op("MatMul", [x, w], name=f"{name}/MatMul")
    return tape.op("Add", [product, b], name=f"{name}/Add")


def _hidden_layers(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each hidden layer, He-normal weights and small biases."""
    layers, width = [], FEATURES
    for out in LAYERS:
        weight = rng.normal(0.0, np.sqrt(2.0 / width), (width, out))
        layers.append((weight.astype(np.float32), rng.normal(0.0, BIAS_STD, out)))
        width = out
    return layers


def _classifier(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the output layer, fitted by ridge regression on the training samples."""
    features, labels = samples(TRAINING_SEED, TRAINING_SAMPLES)
    h = features
    for weight, bias in layers:
        h = np.maximum(h @ weight + bias, 0.0)
    h = np.concatenate([h, np.ones((len(h), 1), np.float32)], axis=1).astype(np.float64)
    gram = h.T @ h
    gram += RIDGE * np.mean(np.diag(gram)) * np.eye(len(gram))
    solution = np.linalg.solve(gram, h.T @ np.eye(CLASSES)[labels])
    return solution[:-1], solution[-1]


def build_reference_mlp(seed: int = 0) -> ir.Model:
    """The reference MLP with hidden weights drawn from ``seed``; the batch is dynamic."""
    tape = ir.tape.Tape()
    layers = _hidden_layers(np.random.default_rng(seed))
    features = ir.Value(
        name="features", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", FEATURES])
    )
    h = features
    for index, (weight, bias) in enumerate(layers):
        h = _linear(tape, h, f"layer{index}", weight, bias)
        h = tape.op("Relu", [h], name=f"layer{index}/Relu")
    logits = _linear(tape, h, "classifier", *_classifier(layers))
    logits.name = "logits"
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape(["batch", CLASSES])
    graph = ir.Graph(
        [features],
        [logits],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": OPSET},
        name="reference_mlp",
    )
    return ir.Model(graph, ir_version=10, producer_name="qgraph.models")


def samples(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (features, label) pairs: a class drawn uniformly, then its cluster's point."""
    centres = np.random.default_rng(CENTRES_SEED).standard_normal((CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    noise = rng.standard_normal((count, FEATURES))
    return (centres[labels] + SPREAD * noise).astype(np.float32), labels


def requests(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` requests of one feature vector each (batch 1)."""
    features, _ = samples(seed, count)
    return [{"features": row[None]} for row in features]


def build(folder: Path) -> None:
    """The zoo recipe: model, calibration and (differently seeded) evaluation requests."""
    save(build_reference_mlp(), folder / "model.onnx")
    write_dataset(
        folder / "calibration",
        requests(CALIBRATION_SEED, CALIBRATION_SAMPLES),
        DatasetInfo("top1", "feature vectors from 10 Gaussian clusters, one request each"),
    )
    write_dataset(
        folder / "evaluation",
        requests(EVALUATION_SEED, EVALUATION_SAMPLES),
        DatasetInfo("top1", "feature vectors from 10 Gaussian clusters, one request each, unseen"),
    )


RECIPES = (
    Recipe(
        "reference-mlp",
        "MLP classifier at batch 1 (MatMul+Add+Relu, 1024-2048-2048-1024-10), seeded and fitted",
        "top1",
        build,
    ),
)
