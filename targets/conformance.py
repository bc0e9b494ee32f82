"""Conformance rules shared by targets: can the target's runtime load this model at all?

Each rule is a function ``(model, target) -> Iterable[Violation]``, named for what it checks.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

from qgraph.graph.ops import ONNX_DOMAINS, onnx_opset
from qgraph.graph.traversal import all_nodes
from qgraph.targets.spec import TargetSpec, Violation


def ir_version_loadable(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """The opsets must not need an IR version above what the runtime reads."""
    opsets = [onnx.helper.make_opsetid(domain, v) for domain, v in model.opset_imports.items()]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    if needed > target.runtime.max_ir_version:
        yield Violation(
            "ir_version_loadable",
            f"the model's opsets need IR version {needed}, above the "
            f"{target.runtime.max_ir_version} that {target.execution_provider} reads",
        )


def opset_loadable(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """The ai.onnx opset must be one the runtime officially runs."""
    opset = onnx_opset(model.opset_imports)
    if opset is not None and opset > target.runtime.max_opset:
        yield Violation(
            "opset_loadable",
            f"ai.onnx opset {opset} is above the {target.runtime.max_opset} that "
            f"{target.execution_provider} runs",
        )


def domains_supported(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Every node's operator domain must be one the runtime executes (or a model function)."""
    local_functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in all_nodes(model.graph):
        if (
            node.domain in target.runtime.allowed_domains
            or (node.domain, node.op_type) in local_functions
        ):
            continue
        yield Violation(
            "domains_supported",
            f"{node.domain}::{node.op_type} is outside the domains {target.name} runs",
            node.name,
        )


def default_domain_ops_known(model: ir.Model, target: TargetSpec) -> Iterator[Violation]:
    """Default-domain ops must be ONNX's own or extensions the target's runtime registers."""
    for node in all_nodes(model.graph):
        if (
            node.domain not in ONNX_DOMAINS
            or node.op_type in target.runtime.default_domain_extensions
        ):
            continue
        if not onnx.defs.has(node.op_type):
            yield Violation(
                "default_domain_ops_known",
                f"{node.op_type} is neither an ONNX op nor one {target.name} adds to its domain",
                node.name,
            )


LOADABLE_RULES = (ir_version_loadable, opset_loadable, domains_supported, default_domain_ops_known)
"""Rules every onnxruntime-based target applies."""
