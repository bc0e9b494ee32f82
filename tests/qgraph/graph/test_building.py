"""qgraph.graph.building: fresh initializers keep their names free and their shapes exact."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.graph.building import fresh_initializer


@pytest.mark.parametrize("array", [np.array(3.0, np.float32), np.ones((2, 3), np.int8)[:, ::2]])
def test_the_data_has_the_declared_shape(array):
    """A 0-d array stays 0-d (``np.ascontiguousarray`` made it [1]); a strided one is copied
    contiguous with its shape."""
    graph = ir.Graph([], [], nodes=[])
    value = fresh_initializer(graph, "c", array)
    assert value.shape == ir.Shape(array.shape) == value.const_value.shape
    np.testing.assert_array_equal(value.const_value.numpy(), array)


def test_a_taken_name_gets_a_number():
    graph = ir.Graph([], [], nodes=[])
    names = [fresh_initializer(graph, "c", np.zeros(1)).name for _ in range(3)]
    assert names == ["c", "c_2", "c_3"]
