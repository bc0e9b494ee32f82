"""``qgraph debug``: which ops cost accuracy, measured at the model's outputs."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import Progress

from qgraph.analysis.debugging import IMPACT_BATCHES, debug_accuracy, write_exclusions
from qgraph.cli.common import OUTPUT, OUTPUT_POLICY, echo_json, err, note_replaced, out
from qgraph.graph.model_io import load, model_inputs
from qgraph.outputs import check_output, dataset_inputs
from qgraph.report import debug_report, printable
from qgraph.sections import counted


@click.command(name="debug")
@click.argument("float_model", metavar="FLOAT", type=click.Path(path_type=Path))
@click.argument("quantized", metavar="QUANT", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="A dataset (a .npz file or a folder of them), e.g. the calibration data.",
)
@click.option("--top", type=int, default=20, show_default=True, help="Rows to show (0: all).")
@click.option(
    "--impact-batches",
    type=click.IntRange(min=0),
    default=IMPACT_BATCHES,
    show_default=True,
    help="Batches on which to measure each op's error alone at the model outputs (one float "
    "run per op and batch; 0: rank by local SQNR instead).",
)
@click.option(
    "--suggest-exclusions",
    "exclusions",
    type=click.IntRange(min=1),
    metavar="K",
    help="Write a recipe keeping in float the K ops that cost the outputs most, the first K "
    "of the ranking (by local SQNR with --impact-batches 0) (see -o).",
)
@click.option(
    "-o",
    "--output",
    type=OUTPUT,
    metavar="PATH",
    help="Where --suggest-exclusions writes its recipe [default: QUANT's name + .exclude.toml]. "
    + OUTPUT_POLICY,
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def debug_command(
    float_model: Path,
    quantized: Path,
    data: Path,
    top: int,
    impact_batches: int,
    exclusions: int | None,
    output: str | None,
    as_json: bool,
) -> None:
    """Find the quantized ops of QUANT (a Q/DQ model compiled from FLOAT) that cost accuracy.

    Runs both models on DATA and, for every op that reads a DequantizeLinear, gives SQNRs,
    10 log10(sum y^2 / sum (y - y')^2) in dB, against the float model (matched by name):
    alone at output, the float model's outputs with only this op's quantization error added
    (the ranking: what the op costs the model); local, the op's output fed the float model's
    own inputs; cumulative, the op's output as the quantized model runs. With
    --suggest-exclusions K it writes a recipe keeping the K worst in float, for
    `qgraph compile --recipe`.

    \b
    Examples:
      qgraph debug model.onnx model.q.onnx --data calib/
      qgraph debug model.onnx model.q.onnx --data calib/ --suggest-exclusions 5 -o keep.toml
      qgraph compile model.onnx --calib calib/ --recipe keep.toml -o model.q2.onnx
    """
    if output is not None and exclusions is None:
        raise click.UsageError("-o is where --suggest-exclusions writes; give it too")
    reference, compiled = load(float_model), load(quantized)
    path = output or str(quantized.with_name(f"{quantized.stem}.exclude.toml"))
    read = {
        **model_inputs(reference, "the float model"),
        **model_inputs(compiled, "the quantized model"),
        **dataset_inputs(data, "the data"),
    }
    replaced = check_output(path, read) if exclusions is not None else False
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def tell(what: str, done: int, total: int | None) -> None:
            bar.update(task, description=what, completed=done, total=total)

        report = debug_accuracy(
            reference, compiled, data, impact_batches=impact_batches, progress=tell
        )
    if as_json:
        echo_json(report.to_json())
    else:
        out.print(debug_report(report, top=top or None))
    if exclusions is not None:
        note = f"qgraph debug {float_model} {quantized} --data {data}"
        chosen = write_exclusions(report, exclusions, Path(path), note)
        err.print(
            printable(
                f"wrote {path}: {counted(len(chosen), 'op')} kept in float; recompile with "
                f"--recipe {path}"
            )
        )
        note_replaced(path, replaced)
