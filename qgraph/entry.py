"""The ``qgraph`` command's entry point, light enough to import that Ctrl-C is caught from the
first moment: loading onnxruntime, onnx and numpy takes seconds, and an interruption then would
otherwise print a traceback through their imports.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130
"""Exit status after Ctrl-C: 128 + SIGINT (2), as shells report a process killed by it."""


def main() -> None:
    """Run the command line; Ctrl-C at any point prints "interrupted" and exits 130."""
    try:
        from qgraph.cli import cli

        cli(prog_name="qgraph")
    except KeyboardInterrupt:
        interrupted()


def interrupted() -> None:
    """Say "interrupted" on stderr and exit with ``INTERRUPTED``."""
    sys.stderr.write("interrupted\n")
    sys.exit(INTERRUPTED)
