"""What the commands share: the consoles, JSON output, output-path help, target help."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.console import Console

from qgraph.report import printable
from qgraph.targets import AUTO, TARGETS

EXTERNAL_DATA_CHOICES = {"auto": None, "always": True, "never": False}

TARGET_HELP = (
    f"One of {', '.join(TARGETS)}, or {AUTO} (this host's CPU; without VNNI, the AVX2 target "
    "whose weight type multiplies faster here, timed once and kept in the cache)."
)

OUTPUT_POLICY = (
    "An existing file there is replaced (with a note); an input of the command, a folder, a "
    "symlink or a device is refused."
)

OUTPUT = click.STRING
"""Output paths stay strings until ``check_output``: a trailing separator (``-o newdir/``)
counts, and a name no file system takes is refused in qgraph's words, not click's."""

PIPED_WIDTH = 120
"""Report width when stdout is not a terminal (rich would assume 80 and wrap tables)."""


out = Console(highlight=False, markup=False)
if not out.is_terminal:
    out = Console(highlight=False, markup=False, width=PIPED_WIDTH)
err = Console(stderr=True, highlight=False, markup=False)


def echo_json(data: object) -> None:
    """Print ``data`` as strict JSON: infinities and NaN become the strings "inf", "-inf", "nan"."""
    click.echo(json.dumps(_finite(data), indent=2))


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def note_replaced(path: str | Path, replaced: bool) -> None:
    """Tell stderr that ``path`` replaced a file that was there."""
    if replaced:
        err.print(printable(f"note: replaced the existing {path}"), soft_wrap=True)
