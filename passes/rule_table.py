"""Tables of onnxscript rewrite rules, applied the way qgraph's rewriting passes share.

A table row (``TableRule``) names a rule, says what it does, lists its rule classes (a
``pattern``, a ``check`` that returns a failure reason, a ``rewrite``) and which targets want
it. ``apply_rules`` rewrites round after round until a round changes nothing, trying each rule
only at nodes of its pattern's root op types (trying every rule at every node costs ~40 us a
try in onnxscript's matcher, most of a minute on SmolLM2), and only in graphs that hold every op
its pattern needs (a GELU-tanh rule's 192 operand orders at each of DenseNet's Muls took
seconds, in a graph without a Tanh). ``near_misses`` runs the matching
again and keeps every failed check that gave a reason, for ``--explain``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import RewriteRule

from qgraph.graph.traversal import carry_metadata
from qgraph.targets import TargetSpec

MAX_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class Variant:
    """One operand order of a rule's pattern; where it may match."""

    roots: frozenset[str]
    """The op types its pattern's last node can have."""
    required: frozenset[str]
    """Op types a graph must hold for the pattern to match anywhere in it."""
    rule: RewriteRule


Variants = list[Variant]
CompiledTable = Sequence[tuple[str, Variants]]
"""(rule name, variants) per row of a table, as ``compile_table`` makes them."""


@dataclasses.dataclass(frozen=True)
class TableRule:
    """A rule of a table: its name, what it does, its rule classes, which targets want it."""

    name: str
    summary: str
    rule_classes: tuple[type[pattern.RewriteRuleClassBase], ...]
    wanted: Callable[[TargetSpec], bool] = lambda target: True

    def variants(self, target: TargetSpec) -> Variants:
        """Every operand order of commutative ops in each pattern."""
        return [
            Variant(rule_class.root_ops, rule_class.required_ops, variant)
            for rule_class in self.rule_classes
            for variant in rule_class.rule(target, self.name).commute()
        ]


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A place a rule almost applied, and why it did not."""

    rule: str
    node: str
    reason: str


def compile_table(
    rules: Sequence[TableRule], target: TargetSpec
) -> tuple[tuple[str, Variants], ...]:
    """(name, variants) of the rules ``target`` wants, in table order."""
    return tuple((rule.name, rule.variants(target)) for rule in rules if rule.wanted(target))


def apply_rules(model: ir.Model, table: CompiledTable) -> dict[str, int]:
    """Apply the table in rounds until one changes nothing; rewrites per rule name."""
    applied = {name: 0 for name, _ in table}
    for _ in range(MAX_ROUNDS):
        changed = 0
        for name, variants in table:
            count = sum(_apply(variants, model, graph) for graph in list(model.graphs()))
            applied[name] += count
            changed += count
        if not changed:
            break
    return applied


def near_misses(model: ir.Model, table: CompiledTable) -> tuple[NearMiss, ...]:
    """Every place a rule's check failed with a reason."""
    recorder = _NearMissRecorder()
    for _, variants in table:
        for graph in model.graphs():
            present = {node.op_type for node in graph}
            for node in graph:
                for variant in variants:
                    if node.op_type in variant.roots and variant.required <= present:
                        variant.rule.try_rewrite(model, graph, node, tracer=recorder)
    return tuple(recorder.misses.values())


def label(node: ir.Node) -> str:
    """The node's name, or ``op_type -> first output`` when it has none."""
    output = node.outputs[0].name if node.outputs else ""
    return node.name or f"{node.op_type} -> {output}"


def _apply(variants: Variants, model: ir.Model, graph: ir.Graph) -> int:
    """Rewrite every match of the rule's variants in ``graph`` (not its subgraphs); the count.

    Nodes nothing reads are skipped: a rule whose pattern ends at a later node leaves the ops
    it absorbed in place, unread, until dead-code removal.
    """
    count = 0
    present = {node.op_type for node in graph}
    variants = [variant for variant in variants if variant.required <= present]
    for node in graph:
        if _unread(node):
            continue
        for variant in variants:
            if node.op_type not in variant.roots:
                continue
            delta = variant.rule.try_rewrite(model, graph, node)
            if delta is None:
                continue
            for initializer in delta.new_initializers:
                graph.register_initializer(initializer)
            carry_metadata(list(delta.match.nodes), node, list(delta.new_nodes))
            ir.convenience.replace_nodes_and_values(
                graph,
                node,
                delta.match.nodes,
                delta.new_nodes,
                delta.match.outputs,
                delta.new_outputs,
            )
            count += 1
            break
    return count


def _unread(node: ir.Node) -> bool:
    return not any(output.uses() or output.is_graph_output() for output in node.outputs)


class _NearMissRecorder:
    """An onnxscript matching tracer keeping every failed check that gave a reason."""

    def __init__(self) -> None:
        self.misses: dict[tuple[str, int, str], NearMiss] = {}

    def log(self, rule, container, node, match_result, status) -> None:
        reason = match_result.reason
        if status.name != "CONDITION_FAILED" or not reason:
            return
        key = (rule.name, id(node), reason)
        self.misses.setdefault(key, NearMiss(rule.name, label(node), reason))
