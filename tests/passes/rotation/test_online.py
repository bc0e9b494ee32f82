"""Online rotations compute ``x Q`` in every form, within float32's a-priori bound, in float.

Each output ``y_j = sum_i x_i Q_ij`` computed in float32 (by any order of additions, through
any factorization of ``Q`` into ``n``-or-fewer-term sums) is within ``gamma (|x| |Q|)_j`` of
the exact value, ``gamma = (n + 2) u / (1 - (n + 2) u)``, ``u = 2^-24`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, 3.5; the factored forms' sums are shorter, ``m + 2^k``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph import verify
from qgraph.graph.traversal import KEEP_FLOAT_KEY
from qgraph.passes.rotation.hadamard import (
    HadamardOrder,
    hadamard_rotation,
    random_rotation,
)
from qgraph.passes.rotation.online import FORM_COSTS, choose_form, insert_online

UNIT_ROUNDOFF = 2.0**-24


def rotation_model(n: int, rotation, form: str) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, "rows", n]))
    relu = ir.node("Relu", [x], name="relu")
    reader = ir.node("Identity", [relu.outputs[0]], name="reader")
    for value in (relu.outputs[0], reader.outputs[0]):
        value.type, value.shape = x.type, x.shape
    reader.outputs[0].name = "y"
    graph = ir.Graph([x], [reader.outputs[0]], nodes=[relu, reader], opset_imports={"": 20})
    insert_online(relu.outputs[0], [reader], rotation, "online", form)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("form", sorted(FORM_COSTS))
@pytest.mark.parametrize("order", [HadamardOrder(12, 7), HadamardOrder(36, 4), HadamardOrder(1, 6)])
def test_every_form_computes_x_q(order, form):
    rotation = hadamard_rotation(order)
    model = rotation_model(order.n, rotation, form)
    x = np.random.default_rng(0).standard_normal((2, 5, order.n)).astype(np.float32)
    (y,) = verify.run(model, {"x": x}).values()
    relu = np.maximum(x, 0).astype(np.float64)
    exact = relu @ rotation.matrix
    gamma = (order.n + 2) * UNIT_ROUNDOFF / (1 - (order.n + 2) * UNIT_ROUNDOFF)
    bound = gamma * (relu @ np.abs(rotation.matrix))
    assert np.all(np.abs(y - exact) <= bound)


def test_the_cheapest_form_is_chosen():
    assert choose_form(hadamard_rotation(HadamardOrder(12, 7))) == "factored"
    assert choose_form(hadamard_rotation(HadamardOrder(36, 4))) == "factored"
    assert choose_form(hadamard_rotation(HadamardOrder(1, 10))) == "butterfly"
    assert choose_form(random_rotation(704, np.random.default_rng(0))) == "dense"
    assert choose_form(random_rotation(576, np.random.default_rng(0))) == "dense"


def test_inserted_ops_are_marked_to_stay_in_float():
    model = rotation_model(64, hadamard_rotation(HadamardOrder(1, 6)), "butterfly")
    added = [node for node in model.graph if node.name.startswith("online/")]
    assert len(added) == FORM_COSTS["butterfly"].nodes(HadamardOrder(1, 6))
    assert all(KEEP_FLOAT_KEY in node.metadata_props for node in added)
