"""``qgraph passes``: the pass table, in run order."""

from __future__ import annotations

import click

from qgraph.cli.common import echo_json, out
from qgraph.pipeline import Phase, fact_name
from qgraph.registry import registered_passes
from qgraph.report import passes_report


@click.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def passes_command(as_json: bool) -> None:
    """List the registered passes, phase by phase (plugins included)."""
    order = list(Phase)
    infos = sorted(registered_passes(), key=lambda info: order.index(info.phase))
    if as_json:
        rows = [
            {
                "name": i.name,
                "phase": i.phase.value,
                "origin": i.origin,
                "summary": i.summary,
                "why": i.why,
                "requires": sorted(map(fact_name, i.requires)),
                "ensures": sorted(map(fact_name, i.ensures)),
            }
            for i in infos
        ]
        echo_json(rows)
    else:
        out.print(passes_report(infos))
