"""``qgraph eval``: a compiled model's speed and accuracy against its float source."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.progress import Progress

from qgraph.cli.common import echo_json, err, out
from qgraph.data import batch_files
from qgraph.evaluation import METRICS, evaluate
from qgraph.graph.model_io import load
from qgraph.report import evaluation_report
from qgraph.stopwatch import ALL_CORES

DEFAULT_THREADS = (1, ALL_CORES) if (os.cpu_count() or 1) > 1 else (1,)
"""One thread, as the plan and the benchmarks time, and every core, as onnxruntime runs."""


@click.command(name="eval")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="A dataset: a .npz file or a folder of them (keys = input names), e.g. a "
    "zoo model's evaluation/ folder.",
)
@click.option(
    "--metric",
    type=click.Choice(list(METRICS)),
    default=None,
    help="How to judge the outputs [default: the dataset's own, else generic].",
)
@click.option(
    "--runs",
    type=int,
    default=20,
    show_default=True,
    help="Timed runs per model for latency (0: no timing).",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),
    multiple=True,
    metavar="N",
    help="Intra-op threads to time both models at, repeatable (0: every core, onnxruntime's "
    "default); the outputs are read at the first [default: 1, and 0 on a host of several "
    "cores].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(
    reference: Path,
    candidate: Path,
    data: Path,
    metric: str | None,
    runs: int,
    threads: tuple[int, ...],
    as_json: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE: accuracy, latency and size.

    Both run in onnxruntime with all optimizations, timed at one intra-op thread and on every
    core unless --threads says otherwise (compile with --threads to plan for a count). A
    model faster at one thread can be slower on every core: a small model's int8 ops gain
    less from threads than its float ones. Metrics: top1
    (argmax agreement), embedding (cosine, nearest-neighbour agreement), causal-lm
    (perplexity ratio, next-token agreement, KL) and generic (SQNR and cosine per output).
    """
    for path in (reference, candidate):
        load(path)  # a bad file is reported here, in qgraph's words
    total = len(batch_files(data))
    with Progress(transient=True, console=err) as bar:
        task = bar.add_task("evaluating", total=total)
        evaluation = evaluate(
            reference,
            candidate,
            data,
            metric=metric,
            runs=runs,
            threads=threads or DEFAULT_THREADS,
            progress=lambda done: bar.update(task, completed=done),
        )
    if as_json:
        echo_json(evaluation.to_json())
    else:
        out.print(evaluation_report(evaluation, str(reference), str(candidate)))
