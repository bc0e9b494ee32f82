"""The ``qgraph`` command line: compile, check, inspect, passes, targets, eval, tune, generate,
models.

Errors a user can cause print one line (``Error: <file>: <what is wrong>``) and exit 1; Ctrl-C
prints "interrupted" and exits 130; ``--debug`` shows the traceback of any error instead.
"""

from __future__ import annotations

import logging

import click

from qgraph.cli.check import check_command
from qgraph.cli.compile import compile_command, pipeline_text
from qgraph.cli.debug import debug_command
from qgraph.cli.eval import eval_command
from qgraph.cli.generate import generate_command
from qgraph.cli.inspect import inspect_command
from qgraph.cli.models import models_group
from qgraph.cli.passes import passes_command
from qgraph.cli.targets import targets_command
from qgraph.cli.tune import tune_command
from qgraph.entry import interrupted
from qgraph.entry import main as entry_main
from qgraph.errors import QGraphError
from qgraph.report import printable

QUIET_LIBRARIES = ("onnxscript", "onnx_ir")
"""Libraries whose warnings are about their own internals, shown only with --debug."""


class _PrintableFormatter(logging.Formatter):
    """Log lines with their control characters written out (names come from models)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class _OnceEachWarning(logging.Filter):
    """Drops a warning already shown: the accuracy plan compiles a model several times, and
    each round would repeat what calibration or the runtime check found."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.shown:
            return False
        self.shown.add(key)
        return True


_ONCE_EACH_WARNING = _OnceEachWarning()
"""One per process: ``logging.basicConfig`` keeps the first command's handler; each command
clears what it has shown."""


class QGraphGroup(click.Group):
    """Turns qgraph's errors into one line and a non-zero exit, and Ctrl-C into "interrupted"
    and exit 130 (``qgraph.entry``), unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QGraphError as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(printable(str(error))) from error
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            interrupted()
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                printable(
                    f"internal error: {type(error).__name__}: {error} (rerun with --debug for "
                    "the traceback, and please report it)"
                )
            ) from error


@click.group(cls=QGraphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.version_option(package_name="qgraph")
def cli(debug: bool) -> None:
    """qgraph: compile ONNX models into quantized models for a target.

    \b
    Typical use:
      qgraph compile model.onnx -o model.q.onnx --target auto
      qgraph check model.q.onnx --target tensorrt
      qgraph inspect model.q.onnx
      qgraph generate model.q.onnx --prompt "Once upon a time"
    """
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    _ONCE_EACH_WARNING.shown.clear()
    handler.addFilter(_ONCE_EACH_WARNING)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    """Entry point of the ``qgraph`` command (``qgraph.entry.main`` catches Ctrl-C sooner)."""
    entry_main()


for _command in (
    compile_command,
    check_command,
    inspect_command,
    debug_command,
    passes_command,
    targets_command,
    eval_command,
    tune_command,
    generate_command,
    models_group,
):
    cli.add_command(_command)

__all__ = ["cli", "main", "pipeline_text"]
