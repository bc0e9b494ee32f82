"""Finalization: leave a model every consumer can read, and prove it before it is written.

- ``remove-unused``: unreachable nodes and initializers, unused functions and opset imports.
- ``topological-sort``: nodes in an order where every input is produced before it is read.
- ``name-fix``: every node and value gets a unique, non-empty name (graph inputs and outputs
  keep theirs).
- ``onnx-checker``: the ONNX checker (without weights, so 2 GB models cost nothing extra). Ops
  the target's runtime adds to the default domain (``RuntimeProfile.default_domain_extensions``)
  are shown to it in a private domain, which it does not check; everything else is checked.
- ``target-conformance``: the target's own rules (``TargetSpec.check``).

The last two only read the model; a failure raises ``ConformanceError`` naming the rule.
``conformance_violations`` runs both and lists what they find (``qgraph check``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from qgraph.errors import ConformanceError, one_line
from qgraph.graph.ops import ONNX_DOMAINS
from qgraph.graph.traversal import all_nodes
from qgraph.pipeline import PassBuilder
from qgraph.targets import TargetSpec, Violation

MAX_VIOLATIONS_SHOWN = 5
CHECKER_RULE = "onnx_checker"
"""The rule name under which ``conformance_violations`` reports the ONNX checker's complaint."""

EXTENSION_DOMAIN = "qgraph.runtime_extension"


class OnnxCheckerPass(ir.passes.InPlacePass):
    """Raise ``ConformanceError`` when the ONNX checker rejects the model."""

    def __init__(self, extensions: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.extensions = extensions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        failure = onnx_checker_failure(model, self.extensions)
        if failure is not None:
            raise ConformanceError(f"the model fails the ONNX checker: {failure}")
        return ir.passes.PassResult(model, modified=False)


def onnx_checker_failure(model: ir.Model, extensions: frozenset[str] = frozenset()) -> str | None:
    """The ONNX checker's complaint about ``model`` as one line, or None if it passes."""
    try:
        with _extensions_hidden(model, extensions):
            common.CheckerPass()(model)
    except onnx.checker.ValidationError as error:
        return one_line(str(error))
    return None


def conformance_violations(model: ir.Model, target: TargetSpec) -> list[Violation]:
    """What the two checks of the finalize phase find wrong with ``model`` for ``target``: the
    ONNX checker's complaint (rule ``onnx_checker``), then each broken target rule."""
    failure = onnx_checker_failure(model, target.runtime.default_domain_extensions)
    found = [Violation(CHECKER_RULE, failure)] if failure is not None else []
    return found + target.check(model)


@contextlib.contextmanager
def _extensions_hidden(model: ir.Model, extensions: frozenset[str]) -> Iterator[None]:
    """Move default-domain ``extensions`` to a private domain the checker skips, then back."""
    moved = [
        n for n in all_nodes(model.graph) if n.domain in ONNX_DOMAINS and n.op_type in extensions
    ]
    original = [node.domain for node in moved]
    if moved:
        model.opset_imports[EXTENSION_DOMAIN] = 1
    for node in moved:
        node.domain = EXTENSION_DOMAIN
    try:
        yield
    finally:
        for node, domain in zip(moved, original, strict=True):
            node.domain = domain
        model.opset_imports.pop(EXTENSION_DOMAIN, None)


class TargetConformancePass(ir.passes.InPlacePass):
    """Raise ``ConformanceError`` listing the target's rules the model breaks."""

    def __init__(self, target: TargetSpec) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        violations = self.target.check(model)
        if violations:
            shown = "; ".join(str(v) for v in violations[:MAX_VIOLATIONS_SHOWN])
            more = len(violations) - MAX_VIOLATIONS_SHOWN
            suffix = f"; and {more} more" if more > 0 else ""
            raise ConformanceError(
                f"the model breaks {len(violations)} rule(s) of target '{self.target.name}': "
                f"{shown}{suffix}"
            )
        return ir.passes.PassResult(model, modified=False)


def remove_unused() -> ir.passes.PassBase:
    return ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
    )


BUILDERS: dict[str, PassBuilder] = {
    "remove-unused": lambda ctx: remove_unused(),
    "topological-sort": lambda ctx: common.TopologicalSortPass(),
    "name-fix": lambda ctx: common.NameFixPass(),
    "onnx-checker": lambda ctx: OnnxCheckerPass(ctx.target.runtime.default_domain_extensions),
    "target-conformance": lambda ctx: TargetConformancePass(ctx.target),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
