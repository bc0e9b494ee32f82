"""onnx's "light" model set, given weights: a corpus of classic CNN exports for compile tests.

The onnx wheel ships nine ImageNet classifiers as exported by Caffe2 at opset 9, IR version 3
(``onnx/backend/test/data/light``): AlexNet, DenseNet-121, Inception v1 and v2, ResNet-50,
ShuffleNet, SqueezeNet, VGG-19 and ZFNet-512. They keep every exporter quirk of their time
(weights listed as graph inputs, ``Sum`` residuals, ``LRN``, decomposed and explicit
BatchNormalization, ``Dropout``, ``Reshape`` to a constant shape) but not their weights: each
large tensor is a ``ConstantOfShape`` of one value, so every channel computes the same thing
and 8-bit rounding of a constant tensor is exact.

``model(name)`` replaces each such fill by a seeded tensor of the same shape, chosen by what
reads it, so activations keep their scale through the depth and quantization has real work:

- a Conv or Gemm weight: He initialisation, ``N(0, 2 / fan_in)``, fan_in the product of the
  dimensions each output sums over (``Cin / group * kh * kw``; ``K`` of a Gemm);
- a BatchNormalization scale or variance: ``U(0.5, 1.5)``; its bias or mean: ``N(0, 0.1)``;
- anything else (Conv and Gemm biases, shapes): ``N(0, 0.01)`` for floats, the fill otherwise.

``feeds(name, count, seed)`` gives seeded ``N(0, 1)`` images of the models' one input size. The
models are random networks: the corpus tests that qgraph compiles and runs them, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

NAMES = (
    "alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)
FILES = {name: f"light_{name}.onnx" for name in NAMES} | {"alexnet": "light_bvlc_alexnet.onnx"}
IMAGE_SHAPE = (1, 3, 224, 224)
WEIGHT_SLOTS = {("Conv", 1), ("Gemm", 1)}
BATCH_NORM_POSITIVE = {1, 4}
"""BatchNormalization inputs that must be positive: scale (1) and variance (4)."""


def folder() -> Path:
    """Where the onnx wheel keeps the light models."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def available() -> bool:
    return all((folder() / FILES[name]).exists() for name in NAMES)


def model(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model ``name`` with every ``ConstantOfShape`` fill replaced by seeded weights
    (see the module doc), listed as graph inputs too as IR version 3 wants; otherwise the
    file as shipped."""
    proto = onnx.load(folder() / FILES[name])
    image_name = _image_input(proto)
    rng = np.random.default_rng(seed)
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    readers = _readers(proto.graph)
    fills = [
        node
        for node in proto.graph.node
        if node.op_type == "ConstantOfShape" and node.input[0] in initializers
    ]
    seeded = []
    for node in fills:
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        fill = numpy_helper.to_array(node.attribute[0].t).reshape(())
        array = _seeded(shape, fill, readers.get(node.output[0], []), rng)
        seeded.append(numpy_helper.from_array(array, node.output[0]))
        proto.graph.node.remove(node)
    for shape_name in {node.input[0] for node in fills}:
        if all(reader.op_type == "ConstantOfShape" for reader, _ in readers[shape_name]):
            del initializers[shape_name]
    weights = [*initializers.values(), *seeded]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(weights)
    image = [value for value in proto.graph.input if value.name == image_name]
    del proto.graph.input[:]
    proto.graph.input.extend(image)
    proto.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights
    )
    return proto


def feeds(name: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` batches of one seeded ``N(0, 1)`` image for the light model ``name``."""
    rng = np.random.default_rng(seed)
    input_name = image_input(name)
    return [{input_name: rng.standard_normal(IMAGE_SHAPE).astype(np.float32)} for _ in range(count)]


def image_input(name: str) -> str:
    """The one graph input of ``name`` that is not also an initializer."""
    return _image_input(onnx.load(folder() / FILES[name], load_external_data=False))


def _image_input(proto: onnx.ModelProto) -> str:
    constants = {tensor.name for tensor in proto.graph.initializer}
    (image,) = [value.name for value in proto.graph.input if value.name not in constants]
    return image


def _readers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    return readers


def _seeded(
    shape: tuple[int, ...],
    fill: np.ndarray,
    readers: list[tuple[onnx.NodeProto, int]],
    rng: np.random.Generator,
) -> np.ndarray:
    if fill.dtype != np.float32:
        return np.full(shape, fill, fill.dtype)
    roles = {(node.op_type, index) for node, index in readers}
    if roles & WEIGHT_SLOTS:
        return rng.normal(0.0, np.sqrt(2.0 / _fan_in(shape, readers)), shape).astype(np.float32)
    if any(op == "BatchNormalization" and index in BATCH_NORM_POSITIVE for op, index in roles):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if any(op == "BatchNormalization" for op, _ in roles):
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    return rng.normal(0.0, 0.01, shape).astype(np.float32)


def _fan_in(shape: tuple[int, ...], readers: list[tuple[onnx.NodeProto, int]]) -> int:
    """What each output of the reading Conv or Gemm sums over."""
    node = next(node for node, index in readers if (node.op_type, index) in WEIGHT_SLOTS)
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return shape[1] if trans_b else shape[0]
