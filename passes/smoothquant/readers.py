"""The weighted ops that can take ``diag(s)``: where their weight's input channels lie.

A reader ``Y = f(X, W)`` is linear in its activation ``X`` along X's channel axis and in its
weight ``W`` along W's input-channel axis, so ``f(X diag(s)^-1, diag(s) W) = f(X, W)``:

- ``MatMul(X[..., K], W[K, N])``: X's last axis, W's axis 0;
- ``Gemm(X[M, K], B)``: X's axis 1, B's axis 0 (axis 1 with ``transB``);
- ``Conv(X[N, C, ...], W[M, C, k...])`` with ``group = 1``: X's axis 1, W's axis 1.

For the alpha search every reader is also a matrix product ``rows @ matrix``: a MatMul's or
Gemm's rows are X's rows; a Conv's are its im2col patches (``C * prod(k)`` values each, channel
``c`` repeated ``prod(k)`` times), gathered with the Conv's strides, pads and dilations (with
``auto_pad``, from the unpadded interior).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

MAX_PATCHES = 2048
"""At most this many Conv output positions stand for a sample of images in the alpha search."""


@dataclasses.dataclass(frozen=True)
class ReaderLayout:
    """Where one op type keeps the channels ``diag(s)`` scales."""

    activation_axis: Callable[[int], int]
    """X's channel axis, given X's rank."""
    weight_axis: Callable[[ir.Node], int]
    """W's input-channel axis."""
    unit_rank: Callable[[int], int]
    """How many trailing axes of X make one sampled unit (a row; an image), given X's rank."""


def _transposed(node: ir.Node) -> bool:
    attribute = node.attributes.get("transB")
    return bool(attribute.as_int()) if attribute is not None else False


READER_LAYOUTS = {
    "MatMul": ReaderLayout(lambda rank: rank - 1, lambda node: 0, lambda rank: 1),
    "Gemm": ReaderLayout(
        lambda rank: 1, lambda node: 1 if _transposed(node) else 0, lambda rank: 1
    ),
    "Conv": ReaderLayout(lambda rank: 1, lambda node: 1, lambda rank: rank - 1),
}


def reader_problem(node: ir.Node, value: ir.Value) -> str | None:
    """Why ``node`` cannot take ``diag(s)`` for its input ``value`` (None if it can)."""
    layout = READER_LAYOUTS.get(node.op_type)
    if layout is None or node.domain != "":
        return f"{node.op_type} '{node.name}' is not a MatMul, Gemm or Conv"
    if len(node.inputs) < 2 or node.inputs[0] is not value or node.inputs[1] is value:
        return f"'{node.name}' does not read it as its activation only"
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return f"'{node.name}' has no constant weight"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return f"'{node.name}' has a weight that is not float32"
    if node.op_type == "MatMul" and len(weight.const_value.shape) != 2:
        return f"'{node.name}' has a weight of rank {len(weight.const_value.shape)}, not 2"
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
        return f"Conv '{node.name}' is grouped (its channels mix no further than the group)"
    if value.shape is None:
        return f"the rank of '{value.name}' is unknown"
    return None


def weight_of(node: ir.Node) -> np.ndarray:
    return node.inputs[1].const_value.numpy()


def channel_maxima(node: ir.Node) -> np.ndarray:
    """``max |W_j|`` per input channel ``j`` of the reader's weight."""
    weight = weight_of(node)
    axis = READER_LAYOUTS[node.op_type].weight_axis(node)
    others = tuple(d for d in range(weight.ndim) if d != axis)
    return np.abs(weight).max(axis=others)


@dataclasses.dataclass(frozen=True)
class ReaderProduct:
    """One reader as ``rows @ matrix(W)``, on a sample of its input, for the alpha search."""

    rows: np.ndarray
    """``[P, K']`` values of X, each column from channel ``channels[column]``."""
    channels: np.ndarray
    """``[K']`` the channel of X each column of ``rows`` (row of the matrix) comes from."""
    weight_axis: int
    to_matrix: Callable[[np.ndarray], np.ndarray]
    """W in its own layout -> the ``[K', N]`` matrix ``rows`` multiplies."""


def reader_product(node: ir.Node, sample: np.ndarray) -> ReaderProduct:
    """``node`` as a matrix product on ``sample`` (rows ``[P, K]``, or images ``[P, C, ...]``)."""
    axis = READER_LAYOUTS[node.op_type].weight_axis(node)
    if node.op_type == "Conv":
        kernel = weight_of(node).shape[2:]
        rows = conv_patches(sample, node, kernel)
        channels = np.repeat(np.arange(sample.shape[1]), math.prod(kernel))
        return ReaderProduct(rows, channels, axis, lambda w: w.reshape(w.shape[0], -1).T)
    channels = np.arange(sample.shape[-1])
    if axis == 1:  # Gemm with transB: B is [N, K]
        return ReaderProduct(sample, channels, axis, lambda w: w.T)
    return ReaderProduct(sample, channels, axis, lambda w: w)


def conv_patches(images: np.ndarray, node: ir.Node, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col of ``images`` ``[P, C, *spatial]`` for ``node``'s geometry: ``[positions,
    C * prod(kernel)]``, at most ``MAX_PATCHES`` evenly spaced positions."""
    spatial = len(kernel)
    strides = node.attributes.get_ints("strides", [1] * spatial)
    dilations = node.attributes.get_ints("dilations", [1] * spatial)
    pads = node.attributes.get_ints("pads", [0] * (2 * spatial))
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        pads = [0] * (2 * spatial)  # a sample of positions: interior ones serve as well
    padding = [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:], strict=True)]
    padded = np.pad(images, padding)
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, extent, axis=tuple(range(2, 2 + spatial))
    )
    steps = tuple(slice(None, None, s) for s in strides)
    taps = tuple(slice(None, None, d) for d in dilations)
    windows = windows[(slice(None), slice(None), *steps, *taps)]
    # [P, C, *out, *k] -> [P, *out, C, *k] -> [positions, C * prod(k)]
    moved = np.moveaxis(windows, 1, 1 + spatial)
    patches = moved.reshape(-1, images.shape[1] * math.prod(kernel))
    if len(patches) > MAX_PATCHES:
        patches = patches[np.linspace(0, len(patches) - 1, MAX_PATCHES).astype(int)]
    return patches
