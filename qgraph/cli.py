"""The ``qgraph`` command line: compile, inspect, passes, targets, models.

Errors a user can cause print one line (``Error: <file>: <what is wrong>``) and exit 1;
``--debug`` shows the traceback of any error instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import click
from rich.console import Console

from qgraph import models
from qgraph.compiler import compile_model
from qgraph.errors import QGraphError
from qgraph.inspection import summarize
from qgraph.model_io import load
from qgraph.options import CompileOptions
from qgraph.pipeline import Phase
from qgraph.registry import registered_passes
from qgraph.report import (
    compile_report,
    passes_report,
    summary_report,
    targets_report,
)
from qgraph.targets import AUTO, TARGETS, detect_host_target, get_target

EXTERNAL_DATA_CHOICES = {"auto": None, "always": True, "never": False}
QUIET_LIBRARIES = ("onnxscript", "onnx_ir")
"""Libraries whose warnings are about their own internals, shown only with --debug."""
TARGET_HELP = f"One of {', '.join(TARGETS)}, or {AUTO} (this host's CPU)."

PIPED_WIDTH = 120
"""Report width when stdout is not a terminal (rich would assume 80 and wrap tables)."""

out = Console(highlight=False, markup=False)
if not out.is_terminal:
    out = Console(highlight=False, markup=False, width=PIPED_WIDTH)
err = Console(stderr=True, highlight=False, markup=False)


class QGraphGroup(click.Group):
    """Turns qgraph's errors into one line and a non-zero exit, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QGraphError as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(error)) from error
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                f"internal error: {type(error).__name__}: {error} (rerun with --debug for the "
                "traceback, and please report it)"
            ) from error


@click.group(cls=QGraphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.version_option(package_name="qgraph")
def cli(debug: bool) -> None:
    """qgraph: compile ONNX models into quantized models for a target.

    \b
    Typical use:
      qgraph compile model.onnx -o model.q.onnx --target auto
      qgraph inspect model.q.onnx
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to write the compiled model [default: MODEL.<target>.onnx beside MODEL].",
)
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option(
    "--skip-pass",
    "skip_passes",
    multiple=True,
    metavar="NAME",
    help="Leave out a registered pass (repeatable; see `qgraph passes`).",
)
@click.option(
    "--external-data",
    type=click.Choice(list(EXTERNAL_DATA_CHOICES)),
    default="auto",
    show_default=True,
    help="Write weights to MODEL.data: auto does so when they exceed protobuf's 2 GB.",
)
@click.option("-v", "--verbose", is_flag=True, help="Print what each pass did.")
def compile_command(
    model: Path,
    output: Path | None,
    target: str,
    skip_passes: tuple[str, ...],
    external_data: str,
    verbose: bool,
) -> None:
    """Compile MODEL for a target and write the result.

    Runs the target's pipeline: canonicalize (shape inference, constant folding, identity,
    CSE and dead-code removal), then finalize (cleanup, topological order, names, ONNX
    checker, target conformance). The input file is never modified.
    """
    spec = get_target(target)
    output = output or model.with_name(f"{model.stem}.{spec.name}.onnx")
    options = CompileOptions(skip_passes=frozenset(skip_passes))
    with err.status("compiling") as status:
        result = compile_model(
            model,
            spec,
            output=output,
            options=options,
            external_data=EXTERNAL_DATA_CHOICES[external_data],
            progress=lambda step: status.update(step),
        )
    out.print(compile_report(result, verbose=verbose))


@cli.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--top", type=int, default=None, help="Show only the N most frequent ops.")
def inspect_command(model: Path, as_json: bool, top: int | None) -> None:
    """Summarize MODEL: interface, opsets, op histogram, parameters by dtype, quantization.

    Tensor data is never read, so this is quick even for multi-GB models.
    """
    summary = summarize(load(model))
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        out.print(summary_report(summary, top_ops=top))


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def passes_command(as_json: bool) -> None:
    """List the registered passes, phase by phase (plugins included)."""
    order = list(Phase)
    infos = sorted(registered_passes(), key=lambda info: order.index(info.phase))
    if as_json:
        rows = [
            {"name": i.name, "phase": i.phase.value, "origin": i.origin, "summary": i.summary}
            for i in infos
        ]
        click.echo(json.dumps(rows, indent=2))
    else:
        out.print(passes_report(infos))


@cli.command(name="targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets and what each emits; marks the one `--target auto` picks here."""
    try:
        host = detect_host_target()
    except QGraphError:
        host = None
    if as_json:
        rows = [dict(t.describe(), auto=t is host) for t in TARGETS.values()]
        click.echo(json.dumps(rows, indent=2))
    else:
        out.print(targets_report(TARGETS.values(), host))


@cli.group(name="models")
def models_group() -> None:
    """The model zoo: reference and real models, built into a local cache."""


@models_group.command(name="list")
def models_list() -> None:
    """List the zoo's models."""
    for recipe in models.RECIPES.values():
        out.print(f"{recipe.name:16} {recipe.summary}")


@models_group.command(name="fetch")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Also copy the model here.")
def models_fetch(name: str, output: Path | None) -> None:
    """Build zoo model NAME into the cache (once) and print its path."""
    zoo_model = models.fetch(name)
    path = zoo_model.model
    if output is not None:
        shutil.copyfile(path, output)
        path = output
    click.echo(str(path))


def main() -> None:
    """Entry point of the ``qgraph`` command."""
    cli(prog_name="qgraph")
