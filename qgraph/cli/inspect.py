"""``qgraph inspect``: a model's op counts and quantization, a diff, a drawing."""

from __future__ import annotations

from pathlib import Path

import click

from qgraph.analysis.drawing import COLLAPSE_ABOVE
from qgraph.analysis.drawing import draw as draw_graph
from qgraph.cli.common import OUTPUT, OUTPUT_POLICY, echo_json, err, note_replaced, out
from qgraph.graph.model_io import load, model_inputs
from qgraph.inspection import diff_models, summarize
from qgraph.outputs import check_output
from qgraph.report import diff_report, printable, summary_report


@click.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--top", type=int, default=None, help="Show only the N most frequent ops.")
@click.option(
    "--diff",
    "other",
    metavar="OTHER",
    type=click.Path(dir_okay=True, path_type=Path),
    help="Compare MODEL with OTHER (e.g. its compile): ops added and removed, nodes each pass "
    "made, tensors quantized by spec, parameters by dtype, size.",
)
@click.option(
    "--draw",
    type=OUTPUT,
    metavar="PATH",
    help="Also draw the graph to this file: .html (self-contained page: hover for scales and "
    "zero points, search by name), .svg or .dot. Quantized ops, Q/DQ and float ops are "
    f"colored apart; above {COLLAPSE_ABOVE} ops, repeated blocks (layers.N) are collapsed "
    "after the first. " + OUTPUT_POLICY,
)
@click.option(
    "--around",
    multiple=True,
    metavar="NODE",
    help="Draw only the region around this node (repeatable); see --radius.",
)
@click.option(
    "--radius",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Edges from an --around node that the region reaches.",
)
def inspect_command(
    model: Path,
    as_json: bool,
    top: int | None,
    other: Path | None,
    draw: str | None,
    around: tuple[str, ...],
    radius: int,
) -> None:
    """Summarize MODEL: interface, opsets, op histogram, parameters by dtype, quantization.

    With --diff OTHER, say what changed from MODEL to OTHER instead. Tensor data is never
    read (except the scales --draw shows), so this is quick even for multi-GB models.

    \b
    Examples:
      qgraph inspect model.q.onnx
      qgraph inspect model.onnx --diff model.q.onnx
      qgraph inspect model.q.onnx --draw model.html
      qgraph inspect model.q.onnx --draw region.svg --around /model/layers.3/mlp/down_proj/MatMul
    """
    if around and draw is None:
        raise click.UsageError("--around selects what --draw draws; give --draw too")
    if draw is not None:
        loaded = load(model)
        read = model_inputs(loaded) | (
            model_inputs(load(other), "the other model") if other else {}
        )
        replaced = check_output(draw, read)
        drawing = draw_graph(loaded, Path(draw), around=around, radius=radius, title=model.name)
        err.print(printable(f"drew {len(drawing.boxes)} boxes to {draw}"))
        note_replaced(draw, replaced)
    if other is not None:
        diff = diff_models(load(model), load(other))
        if as_json:
            echo_json(diff.to_json())
        else:
            out.print(diff_report(diff, str(model), str(other)))
        return
    summary = summarize(load(model))
    if as_json:
        echo_json(summary.to_json())
    else:
        out.print(summary_report(summary, top_ops=top))
