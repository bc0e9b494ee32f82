"""``qgraph check``: does a model conform to a target's rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from qgraph.cli.common import TARGET_HELP, echo_json, out
from qgraph.graph.model_io import load
from qgraph.passes.finalize import CHECKER_RULE, conformance_violations
from qgraph.report import check_report
from qgraph.targets import AUTO, get_target


@click.command(name="check")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and violations as JSON.")
def check_command(model: Path, target: str, as_json: bool) -> None:
    """Check MODEL against a target: the ONNX checker, then each of the target's conformance
    rules (what `compile` checks last; `qgraph targets` lists every target's rules).

    Prints a row per violation (rule, node, what is wrong) and exits with status 1 when MODEL
    breaks a rule, 0 when it conforms. MODEL can come from any tool, not only from qgraph.

    \b
    Examples:
      qgraph check model.q.onnx --target tensorrt
      qgraph check model.q.onnx --target tensorrt --json
    """
    spec = get_target(target)
    violations = conformance_violations(load(model), spec)
    rules = [CHECKER_RULE, *(rule.__name__ for rule in spec.conformance_rules)]
    if as_json:
        echo_json(
            {
                "model": str(model),
                "target": spec.name,
                "conforms": not violations,
                "rules": rules,
                "violations": [dataclasses.asdict(v) for v in violations],
            }
        )
    else:
        out.print(check_report(str(model), spec, rules, violations))
    if violations:
        raise click.exceptions.Exit(1)
