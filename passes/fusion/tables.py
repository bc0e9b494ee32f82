"""An elementwise op on looked-up rows is a lookup of the op's rows: ``f(Gather(T, ids)) ->
Gather(f(T), ids)``.

For ``f`` elementwise, of the gathered rows alone or with a constant ``c`` that varies along
the rows' last axis only (a bias, a scale per column), element ``[..., j]`` of
``f(Gather(T, ids))`` is ``f(T[ids[...], j], c_j)``: ``f`` of the one table element that
``Gather(f(T), ids)`` reads at the same place. So ``f`` is computed once, on the table, by the
same onnxruntime kernel (contrib ops included), and the lookup reads its results. Where a run
gathers more rows than the table holds (magika gathers 2048 rows of a 258-row byte table per
sample, then adds a bias and takes a GELU of them), the op's work per run is gone; the table
does not grow. A table read by anything else is left alone: folding would copy it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion.rules import (
    FLOAT_TYPES,
    MatchResult,
    TargetRule,
    constant,
    fail,
    fresh_weight,
    not_a_candidate,
)

UNARY_OPS = (
    ("", "Relu"),
    ("", "Sigmoid"),
    ("", "Tanh"),
    ("", "Erf"),
    ("", "Gelu"),
    (MICROSOFT_DOMAIN, "Gelu"),
    (MICROSOFT_DOMAIN, "FastGelu"),
)
"""Elementwise ops of one input whose value at a table element the table can hold."""
BINARY_OPS = ("Add", "Sub", "Mul", "Div")
"""Elementwise ops of the rows (first) and a constant."""
MAX_TABLE_ELEMENTS = 1 << 24
"""Largest table folded (elements): evaluating ``f`` on it takes one onnxruntime run."""


class _TableFold(TargetRule):
    """``f(Gather(T, ids)[, c])`` -> ``Gather(f(T[, c]), ids)``."""

    op_type = ""
    domain = ""
    binary = False

    def check(self, context, table, ids, rows, out, **_) -> MatchResult:
        gather, node = rows.producer(), out.producer()
        array = constant(table)
        if array is None or table.dtype not in FLOAT_TYPES or array.ndim != 2:
            return not_a_candidate()
        if gather.attributes.get_int("axis", 0) != 0:
            return fail("the Gather is not along the table's rows", gather)
        if len(rows.uses()) != 1 or rows.is_graph_output():
            return fail("the gathered rows are read by more than this op", gather)
        if len(table.uses()) != 1 or table.is_graph_output():
            return fail(f"table '{table.name}' is read elsewhere: folding would copy it", gather)
        if array.size > MAX_TABLE_ELEMENTS:
            return fail(f"table '{table.name}' has over {MAX_TABLE_ELEMENTS} elements", gather)
        self._constant = None
        if self.binary:
            self._constant, problem = _per_column(node.inputs[1], array.shape[1])
            if problem:
                return fail(problem, node)
        self._node = node
        return MatchResult()

    def rewrite(self, op, table, ids, rows, out, **_):
        folded = evaluate(self._node, constant(table), self._constant, self._opsets(table))
        return op.Gather(fresh_weight(op, table, folded, "folded"), ids, axis=0)

    def _opsets(self, table: ir.Value) -> dict[str, int]:
        graph = table.graph
        model_opsets = graph.opset_imports if graph is not None else {}
        return {"": model_opsets.get("", 17), MICROSOFT_DOMAIN: 1}


class _UnaryFold(_TableFold):
    def pattern(self, op, table, ids):
        rows = op.Gather(table, ids, _outputs=["rows"])
        return getattr(op, self.op_type)(
            rows, _domain=self.domain, _allow_other_attributes=True, _outputs=["out"]
        )


class _BinaryFold(_TableFold):
    binary = True

    def pattern(self, op, table, ids, c):
        rows = op.Gather(table, ids, _outputs=["rows"])
        return getattr(op, self.op_type)(rows, c, _outputs=["out"])


def _per_column(value: ir.Value, columns: int) -> tuple[np.ndarray | None, str | None]:
    """(the constant as one value per column, or None; why it is not one)."""
    array = constant(value)
    if array is None:
        return None, f"'{value.name}' is not a constant"
    if array.ndim and (
        any(d != 1 for d in array.shape[:-1]) or array.shape[-1] not in (1, columns)
    ):
        return None, f"'{value.name}' of shape {list(array.shape)} varies along more than columns"
    return array.reshape(-1), None


def evaluate(
    node: ir.Node, table: np.ndarray, column: np.ndarray | None, opsets: dict[str, int]
) -> np.ndarray:
    """``node``'s op on ``table`` (and the per-column constant ``column``), in onnxruntime."""
    inputs = ["table"] + (["column"] if column is not None else [])
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    graph = helper.make_graph(
        [helper.make_node(node.op_type, inputs, ["y"], domain=node.domain, **attributes)],
        "fold",
        [
            helper.make_tensor_value_info(
                "table", helper.np_dtype_to_tensor_dtype(table.dtype), None
            )
        ],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(table.dtype), None)],
        [numpy_helper.from_array(column, "column")] if column is not None else [],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    model.ir_version = min(model.ir_version, 10)  # what onnxruntime 1.31+ loads
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"table": table})[0]


def _rule(domain: str, op_type: str, base: type[_TableFold]) -> type[_TableFold]:
    name = f"TableFold{op_type}{'Ms' if domain else ''}"
    fields = {"op_type": op_type, "domain": domain, "root_ops": frozenset({op_type})}
    return type(name, (base,), fields | {"required_ops": frozenset({"Gather"})})


RULES = tuple(_rule(domain, op_type, _UnaryFold) for domain, op_type in UNARY_OPS) + tuple(
    _rule("", op_type, _BinaryFold) for op_type in BINARY_OPS
)
"""One rule per op of ``UNARY_OPS`` and ``BINARY_OPS``."""
