"""Elementwise ops on looked-up rows folded into the table: exact, and only where folding
neither copies a table nor changes what another reader sees."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import verify

RNG = np.random.default_rng(5)
ROWS, COLUMNS = 7, 4
TABLE = RNG.standard_normal((ROWS, COLUMNS)).astype(np.float32)
IDS = np.array([[0, 6, 3, 3, 1], [2, 2, 5, 4, 0]], np.int64)


def lookup_model(ops: list[helper.NodeProto], initializers=(), extra_outputs=()):
    """``y = ops(Gather(T, ids))``: the rows are ``rows``, ops end in ``y``."""
    nodes = [helper.make_node("Gather", ["T", "ids"], ["rows"], axis=0), *ops]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(IDS.shape))],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [*IDS.shape, COLUMNS])
            for name in ("y", *extra_outputs)
        ],
        [numpy_helper.from_array(TABLE, "T"), *initializers],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def bias(shape) -> list:
    return [numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), "c")]


def test_a_bias_and_a_gelu_after_a_lookup_fold_into_the_table(fuse, ops):
    proto = lookup_model(
        [
            helper.make_node("Add", ["rows", "c"], ["biased"]),
            helper.make_node("FastGelu", ["biased"], ["y"], domain="com.microsoft"),
        ],
        bias((1, 1, COLUMNS)),
    )
    model, report = fuse(proto, feeds={"ids": IDS}, rtol=0)
    assert report.applied["table-fold"] == 2
    assert ops(model) == ["Gather"]
    table = next(iter(model.graph.initializers.values())).const_value.numpy()
    assert table.shape == (ROWS, COLUMNS), "the table does not grow"


@pytest.mark.parametrize("op", ["Sub", "Div", "Mul"])
def test_a_per_column_constant_on_either_ordered_op_folds_exactly(fuse, ops, op):
    proto = lookup_model([helper.make_node(op, ["rows", "c"], ["y"])], bias((COLUMNS,)))
    model, report = fuse(proto, feeds={"ids": IDS}, rtol=0)
    assert report.applied["table-fold"] == 1 and ops(model) == ["Gather"]


def test_a_constant_varying_along_the_gathered_axes_is_not_folded(fuse, ops):
    proto = lookup_model([helper.make_node("Add", ["rows", "c"], ["y"])], bias((2, 1, COLUMNS)))
    model, report = fuse(proto, feeds={"ids": IDS})
    assert report.applied["table-fold"] == 0 and "Add" in ops(model)
    reasons = {miss.reason for miss in report.near_misses}
    assert "'c' of shape [2, 1, 4] varies along more than columns" in reasons


def test_rows_read_by_another_op_are_not_folded(fuse, ops):
    proto = lookup_model(
        [helper.make_node("Relu", ["rows"], ["y"]), helper.make_node("Neg", ["rows"], ["z"])],
        extra_outputs=("z",),
    )
    model, report = fuse(proto, feeds={"ids": IDS})
    assert report.applied["table-fold"] == 0 and "Relu" in ops(model)


def test_the_fold_keeps_magikas_rows(magika_values):
    """magika's byte table, bias and GELU become one lookup; the rows it gathers are the
    values the written-out GELU gave, to float32 rounding (fused, it is onnxruntime's
    FastGelu kernel, run on the table)."""
    original, fused = magika_values(["ApplyActivation_0/Mul_5:0"])
    assert not verify.compare(original, fused)
