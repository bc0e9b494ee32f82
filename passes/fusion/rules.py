"""What every fusion rule shares: the target it reads, constants, fresh weights, failure reasons.

Rules are onnxscript rewrite rules (a ``pattern``, a ``check`` that returns a failure reason,
a ``rewrite``). Patterns are kept loose and checks strict, so that a near-miss has a reason a
person can act on ("weights 'w' are shared with 'other'") rather than "no match".
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qgraph.graph.ops import onnx_opset
from qgraph.targets import TargetSpec

MatchResult = pattern.MatchResult
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


class TargetRule(pattern.RewriteRuleClassBase):
    """A rewrite rule that may read the target's fields (never its name).

    ``root_ops``: the op types its pattern's last node can have (where matching starts);
    ``required_ops``: op types every match holds (a graph without one is skipped).
    """

    root_ops: frozenset[str] = frozenset()
    required_ops: frozenset[str] = frozenset()

    def __init__(self, target: TargetSpec, name: str) -> None:
        super().__init__(name=name)
        self.target = target


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant nobody can override at run time, else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else None."""
    array = constant(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def close_to(actual: float | None, expected: float, rtol: float = 1e-6) -> bool:
    """Whether a constant equals ``expected`` up to float32 rounding of the exporter."""
    return actual is not None and abs(actual - expected) <= rtol * abs(expected)


def weight_problem(weight: ir.Value | None, user: ir.Node) -> str | None:
    """Why ``weight`` cannot be rewritten for ``user`` alone (None if it can)."""
    if weight is None:
        return "it has no weight input"
    if constant(weight) is None:
        return f"weight '{weight.name}' is not a constant"
    others = sorted({n.name or n.op_type for n, _ in weight.uses() if n is not user})
    if others:
        return f"weight '{weight.name}' is shared with {', '.join(others)}; folding would untie it"
    return None


def fresh_weight(op, like: ir.Value, array: np.ndarray, suffix: str) -> ir.Value:
    """A new initializer beside ``like`` (same dtype) named ``<like>.<suffix>``, unique."""
    graph = like.graph
    taken = graph.initializers if graph is not None else {}
    base = f"{like.name}.{suffix}"
    name, index = base, 1
    while name in taken:
        name, index = f"{base}.{index}", index + 1
    dtype = like.const_value.dtype if like.const_value is not None else ir.DataType.FLOAT
    return op.initializer(ir.tensor(array.astype(dtype.numpy()), name=name), name=name)


def reduction_axes(node: ir.Node) -> list[int] | None:
    """The axes a Reduce op names: its ``axes`` input (from opset 13 or 18, by op) or attribute;
    ``[]`` where it names none, None where the input is not a constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant(node.inputs[1])
        return None if array is None else array.reshape(-1).tolist()
    return list(node.attributes.get_ints("axes", []))


def model_opset(context) -> int:
    """The ai.onnx opset of the model being rewritten."""
    return onnx_opset(context.model.opset_imports, 1)


def fail(reason: str, *sources: ir.Node | ir.Value) -> MatchResult:
    """A failed check with the reason ``--explain`` reports."""
    return MatchResult().fail(reason, list(sources) or None)


def not_a_candidate() -> MatchResult:
    """A failed check that is no near-miss (the match was a coincidence); not reported."""
    return MatchResult().fail("")
