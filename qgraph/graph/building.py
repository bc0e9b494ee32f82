"""Adding to a graph: constants under names it does not use yet."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def fresh_initializer(
    graph: ir.Graph, stem: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    """A new initializer of ``graph`` holding ``array``, named ``stem``, or ``stem_2``,
    ``stem_3``... whichever is free."""
    name, count = stem, 1
    while name in graph.initializers:
        count += 1
        name = f"{stem}_{count}"
    tensor = ir.Tensor(np.asarray(array, order="C"), dtype=dtype, name=name)  # keeps 0-d
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value
