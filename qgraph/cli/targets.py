"""``qgraph targets``: the target records."""

from __future__ import annotations

import click

from qgraph.cli.common import echo_json, out
from qgraph.errors import QGraphError
from qgraph.report import targets_report
from qgraph.targets import TARGETS, detect_host_target, host_targets
from qgraph.targets.kernel_race import host_kernel_race


@click.command(name="targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets and what each emits; marks the one `--target auto` picks here.

    On an x86 host without VNNI, auto picks between x86-avx2 and x86-avx2-u8 by timing
    both weight types' kernels once (cached); the listing ends with that race."""
    try:
        raced = len(host_targets()) > 1
        host = detect_host_target()
    except QGraphError:
        host, raced = None, False
    if as_json:
        rows = [dict(t.describe(), auto=t is host) for t in TARGETS.values()]
        echo_json(rows)
    else:
        out.print(targets_report(TARGETS.values(), host, host_kernel_race() if raced else None))
