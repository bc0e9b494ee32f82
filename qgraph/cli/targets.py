"""``qgraph targets``: the target records."""

from __future__ import annotations

import click

from qgraph.cli.common import echo_json, out
from qgraph.errors import QGraphError
from qgraph.report import targets_report
from qgraph.targets import TARGETS, detect_host_target


@click.command(name="targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets and what each emits; marks the one `--target auto` picks here."""
    try:
        host = detect_host_target()
    except QGraphError:
        host = None
    if as_json:
        rows = [dict(t.describe(), auto=t is host) for t in TARGETS.values()]
        echo_json(rows)
    else:
        out.print(targets_report(TARGETS.values(), host))
