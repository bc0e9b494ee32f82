"""A ResNet-style CNN with seeded weights, built with onnx_ir (no torch).

image [N, 3, 32, 32] -> stem (Conv3x3-BN-Relu, 16 ch) -> two residual blocks
(Conv-BN-Relu, Conv-BN, + shortcut, Relu; the second halves the resolution and doubles the
channels, its shortcut a 1x1 Conv-BN) -> GlobalAveragePool -> Flatten -> Gemm -> logits [N, 10].

BatchNormalization stays a separate node, as exporters leave it, so that fusion has work to do.
Weights use He initialisation, so activations keep their scale through the depth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.data import DatasetInfo, write_dataset
from qgraph.graph.model_io import save
from qgraph.models import Recipe

OPSET = 17
IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
BATCH = 8
CALIBRATION_BATCHES = 8
EVALUATION_BATCHES = 32
CALIBRATION_SEED, EVALUATION_SEED = 1, 2


class _Weights:
    """Seeded initializers, named by the layer they belong to."""

    def __init__(self, tape: ir.tape.Tape, seed: int) -> None:
        self.tape = tape
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(array.astype(np.float32), name=name), name=name)

    def he(self, name: str, shape: tuple[int, ...], fan_in: int) -> ir.Value:
        return self.add(name, self.rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))

    def batch_norm(self, name: str, channels: int) -> list[ir.Value]:
        return [
            self.add(f"{name}.gamma", self.rng.uniform(0.5, 1.5, channels)),
            self.add(f"{name}.beta", self.rng.normal(0.0, 0.1, channels)),
            self.add(f"{name}.mean", self.rng.normal(0.0, 0.1, channels)),
            self.add(f"{name}.var", self.rng.uniform(0.5, 1.5, channels)),
        ]


def _conv_bn(
    w: _Weights, x: ir.Value, name: str, cin: int, cout: int, kernel: int, stride: int = 1
) -> ir.Value:
    weight = w.he(f"{name}.weight", (cout, cin, kernel, kernel), cin * kernel * kernel)
    pad = kernel // 2
    conv = w.tape.op(
        "Conv",
        [x, weight],
        {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [pad] * 4},
        name=f"{name}/Conv",
    )
    return w.tape.op(
        "BatchNormalization",
        [conv, *w.batch_norm(f"{name}.bn", cout)],
        {"epsilon": 1e-5},
        name=f"{name}/BatchNormalization",
    )


def _residual_block(
    w: _Weights, x: ir.Value, name: str, cin: int, cout: int, stride: int
) -> ir.Value:
    h = w.tape.op(
        "Relu", [_conv_bn(w, x, f"{name}.conv1", cin, cout, 3, stride)], name=f"{name}/Relu1"
    )
    h = _conv_bn(w, h, f"{name}.conv2", cout, cout, 3)
    shortcut = (
        x if stride == 1 and cin == cout else _conv_bn(w, x, f"{name}.down", cin, cout, 1, stride)
    )
    added = w.tape.op("Add", [h, shortcut], name=f"{name}/Add")
    return w.tape.op("Relu", [added], name=f"{name}/Relu2")


def build_reference_cnn(seed: int = 0) -> ir.Model:
    """The reference CNN with weights drawn from ``seed``; the batch dimension is dynamic."""
    tape = ir.tape.Tape()
    w = _Weights(tape, seed)
    image = ir.Value(
        name="image", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", *IMAGE_SHAPE])
    )
    h = tape.op("Relu", [_conv_bn(w, image, "stem", IMAGE_SHAPE[0], 16, 3)], name="stem/Relu")
    h = _residual_block(w, h, "block1", 16, 16, 1)
    h = _residual_block(w, h, "block2", 16, 32, 2)
    pooled = tape.op("GlobalAveragePool", [h], name="head/GlobalAveragePool")
    flat = tape.op("Flatten", [pooled], {"axis": 1}, name="head/Flatten")
    fc_w = w.he("head.fc.weight", (CLASSES, 32), 32)
    fc_b = w.add("head.fc.bias", np.zeros(CLASSES))
    logits = tape.op("Gemm", [flat, fc_w, fc_b], {"transB": 1}, name="head/Gemm")
    logits.name = "logits"
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape(["batch", CLASSES])
    graph = ir.Graph(
        [image],
        [logits],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": OPSET},
        name="reference_cnn",
    )
    return ir.Model(graph, ir_version=10, producer_name="qgraph.models")


def images(seed: int, batches: int) -> list[dict[str, np.ndarray]]:
    """Standard-normal ``image`` batches, as a normalized input pipeline would produce."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, *IMAGE_SHAPE)
    return [{"image": rng.standard_normal(shape, dtype=np.float32)} for _ in range(batches)]


def build(folder: Path) -> None:
    """The zoo recipe: model, calibration and (differently seeded) evaluation images."""
    save(build_reference_cnn(), folder / "model.onnx")
    write_dataset(
        folder / "calibration",
        images(CALIBRATION_SEED, CALIBRATION_BATCHES),
        DatasetInfo("top1", "standard-normal images"),
    )
    write_dataset(
        folder / "evaluation",
        images(EVALUATION_SEED, EVALUATION_BATCHES),
        DatasetInfo("top1", "standard-normal images, held out"),
    )


RECIPES = (
    Recipe(
        "reference-cnn",
        "ResNet-style CNN (Conv-BN-Relu, residual Add, pooling, Gemm), seeded weights",
        "top1",
        build,
    ),
)
