"""A reader as a matrix product: im2col patches of a Conv times its weight give its output."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from qgraph import verify
from qgraph.passes.smoothquant.readers import MAX_PATCHES, reader_product

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 2, 1]},
        {"strides": [3, 3], "pads": [2, 0, 0, 2]},
    ],
)
def test_conv_patches_times_the_weight_matrix_are_the_conv_output(make_model, attributes):
    """Exact up to float32 summation order: ``C k^2 = 27`` products per output."""
    weight = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    images = RNG.standard_normal((2, 3, 9, 11)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attributes)],
        {"x": list(images.shape)},
        {"y": None},
        {"W": weight},
    )
    model = ir.from_proto(proto)
    expected = verify.run(model, {"x": images})["y"]  # [P, M, H', W']
    product = reader_product(model.graph.node(0), images)
    actual = product.rows @ product.to_matrix(weight)  # [P * H' * W', M]
    np.testing.assert_allclose(
        actual, expected.transpose(0, 2, 3, 1).reshape(-1, 4), rtol=1e-5, atol=1e-5
    )
    assert list(product.channels) == [c for c in range(3) for _ in range(9)]


def test_many_positions_are_thinned_evenly(make_model):
    images = RNG.standard_normal((40, 2, 16, 16)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
        {"x": list(images.shape)},
        {"y": None},
        {"W": RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)},
    )
    product = reader_product(ir.from_proto(proto).graph.node(0), images)
    assert product.rows.shape == (MAX_PATCHES, 2)
    np.testing.assert_array_equal(product.rows[0], images[0, :, 0, 0])
    np.testing.assert_array_equal(product.rows[-1], images[-1, :, -1, -1])


def test_gemm_with_transposed_weight_reads_rows_of_b(make_model):
    rows = RNG.standard_normal((5, 6)).astype(np.float32)
    b = RNG.standard_normal((4, 6)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)],
        {"x": [5, 6]},
        {"y": [5, 4]},
        {"B": b},
    )
    node = ir.from_proto(proto).graph.node(0)
    product = reader_product(node, rows)
    assert product.weight_axis == 1
    np.testing.assert_allclose(product.rows @ product.to_matrix(b), rows @ b.T, rtol=1e-6)
