"""qgraph over the onnx package's backend node tests: does a rewrite keep every op's function?

Each node test is a small model (usually one op) with inputs and expected outputs. onnx 1.23
no longer ships them as files (``onnx/backend/test/data/node``), so they are generated in
memory from the case definitions the wheel still carries (``onnx.backend.test.case.node``),
which is what produced those files. For each case, the original and the rewritten model run in
onnxruntime (optimizations off) on the case's inputs, and their outputs are compared with
``qgraph.verify.compare``. Cases onnxruntime cannot run as given are skipped with the reason,
as are random ops, whose outputs differ from run to run by design.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.backend.test.case import node as node_cases
from onnx.backend.test.case.test_case import TestCase

from qgraph.errors import QGraphError
from qgraph.graph.model_io import load
from qgraph.graph.ops import ONNX_DOMAINS
from qgraph.targets.runtime import MAX_ORT_IR_VERSION, MAX_ORT_OPSET
from qgraph.verify import compare, run

RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
REASON_LENGTH = 110

Rewrite = Callable[[ir.Model], ir.Model]
"""What is under test: takes the loaded original, returns the rewritten model."""


class Status(str, enum.Enum):
    PASS = "pass"
    SKIP = "skip"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class CaseOutcome:
    case: str
    status: Status
    reason: str = ""


@functools.cache
def node_test_cases() -> Sequence[TestCase]:
    """Every node test case of the installed onnx package (takes ~15 s the first time)."""
    with np.errstate(all="ignore"):
        return tuple(sorted(node_cases.collect_testcases(None), key=lambda case: case.name))


def check_case(case: TestCase, rewrite: Rewrite) -> CaseOutcome:
    """Run ``case`` through ``rewrite`` and compare the outputs in onnxruntime."""
    proto = onnx.ModelProto()
    proto.CopyFrom(case.model)
    random_ops = sorted({n.op_type for n in proto.graph.node} & RANDOM_OPS)
    if random_ops:
        return _outcome(case, Status.SKIP, f"random op {random_ops[0]}: outputs vary by run")
    proto.ir_version = min(proto.ir_version, MAX_ORT_IR_VERSION)
    changed = _restamp_opset(proto, MAX_ORT_OPSET)
    if changed is not None:
        return _outcome(case, Status.SKIP, changed)
    original = proto.SerializeToString()
    feeds_list = [_feeds(proto.graph, inputs) for inputs, _ in case.data_sets]
    exotic = _exotic_feed(feeds_list[0])
    if exotic is not None:
        return _outcome(case, Status.SKIP, exotic)
    try:
        expected = [run(original, feeds) for feeds in feeds_list]
    except Exception as error:  # onnxruntime's own limits decide what can be compared
        return _outcome(case, Status.SKIP, "onnxruntime cannot run it: " + short(error))
    try:
        candidate = rewrite(load(original))
    except QGraphError as error:
        return _outcome(case, Status.FAIL, f"rewrite failed: {error}")
    for feeds, reference in zip(feeds_list, expected, strict=True):
        try:
            actual = run(candidate, feeds)
        except Exception as error:
            return _outcome(
                case, Status.FAIL, "rewritten model fails in onnxruntime: " + short(error)
            )
        mismatches = compare(reference, actual)
        if mismatches:
            return _outcome(case, Status.FAIL, "; ".join(map(str, mismatches)))
    return _outcome(case, Status.PASS)


def _restamp_opset(proto: onnx.ModelProto, limit: int) -> str | None:
    """Lower an ai.onnx opset above ``limit`` to it if no op changed in between; else why not."""
    stamp = next((o for o in proto.opset_import if o.domain in ONNX_DOMAINS), None)
    if stamp is None or stamp.version <= limit:
        return None
    for node in _all_nodes(proto.graph):
        if node.domain not in ONNX_DOMAINS:
            continue
        try:
            newest = onnx.defs.get_schema(node.op_type, stamp.version).since_version
            older = onnx.defs.get_schema(node.op_type, limit).since_version
        except onnx.defs.SchemaError:
            older, newest = None, -1
        if older != newest:
            return (
                f"stamped opset {stamp.version}; {node.op_type} changed after opset {limit}, "
                f"the newest onnxruntime runs"
            )
    stamp.version = limit
    return None


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for subgraph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                nodes.extend(_all_nodes(subgraph))
    return nodes


def _outcome(case: TestCase, status: Status, reason: str = "") -> CaseOutcome:
    return CaseOutcome(case.name, status, reason)


def _feeds(graph: onnx.GraphProto, inputs: Sequence[object]) -> dict[str, object]:
    initializers = {init.name for init in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    return {name: _as_feed(value) for name, value in zip(names, inputs, strict=False)}


def _exotic_feed(feeds: dict[str, object]) -> str | None:
    """Why onnxruntime's Python API cannot take these inputs (ml_dtypes arrays), if it cannot."""
    for name, value in feeds.items():
        if isinstance(value, np.ndarray) and value.dtype.type.__module__.startswith("ml_dtypes"):
            return f"input '{name}' is {value.dtype}, which onnxruntime's Python API cannot take"
    return None


def _as_feed(value: object) -> object:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if value is None or isinstance(value, (list, dict)):
        return value
    return np.asarray(value)


def short(error: BaseException) -> str:
    """One line of ``error``, without the node names that make every message unique."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : ", "", text)
    text = re.sub(r"(node|Node) (with name )?'[^']*'", "node", text)
    return text[:REASON_LENGTH]
