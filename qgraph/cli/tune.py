"""``qgraph tune``: an accuracy-constrained search for the fastest recipe."""

from __future__ import annotations

from pathlib import Path

import click

from qgraph import tuning
from qgraph.cli.common import TARGET_HELP, echo_json, err, out
from qgraph.evaluation import METRICS
from qgraph.report import printable
from qgraph.targets import AUTO


@click.command(name="tune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration data: a .npz file or a folder of them [default: NAME.calibration/ "
    "beside NAME.onnx, as `qgraph models fetch -o` writes it].",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    help="Evaluation data each trial is scored on, held out from --calib [default: "
    "NAME.evaluation/ beside NAME.onnx].",
)
@click.option(
    "--max-drop",
    metavar="X|X%",
    help="The most the score may fall below the float model's own: absolute (0.005), or "
    "relative with a % sign (1%); for a lower-is-better metric (perplexity ratio), a rise.",
)
@click.option(
    "--threshold",
    type=float,
    metavar="S",
    help="Instead of --max-drop: the worst score allowed, at least S (at most S where lower "
    "is better); the float model must meet it. The generic metric (SQNR, dB) needs this.",
)
@click.option(
    "--metric",
    metavar="NAME|pkg.module:function",
    help=f"How a trial's accuracy is scored: a zoo metric ({', '.join(METRICS)}) against the "
    "float model, or function(model_path, data_path) -> float, higher is better, called on "
    "each compiled model and on the float model [default: the --eval dataset's own, else "
    "generic].",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Trials the study holds when done (a resumed study counts its own).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials compiled and scored at once (local processes, or Ray CPUs); "
    "timings still run one at a time per machine.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="[ADDRESS]",
    is_flag=False,
    flag_value=tuning.LOCAL_RAY,
    help="Run trials as Ray tasks: alone, on a Ray started here with --workers CPUs; with "
    "ADDRESS (auto, or ray://HOST:10001), on that cluster, whose nodes must see the model, "
    "the data and -o at the same paths (pip install 'qgraph[ray]').",
)
@click.option(
    "--study",
    "study_path",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="PATH.db",
    help="Keep the study in this SQLite file: a rerun resumes it, several tunes may share "
    "it, optuna-dashboard sqlite:///PATH.db shows it [default: in memory].",
)
@click.option(
    "--sampler",
    type=click.Choice([s.value for s in tuning.Sampler]),
    default=tuning.Sampler.TPE.value,
    show_default=True,
    help="Optuna's multi-objective sampler.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed runs per trial (median, interleaved with the float model).",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),
    default=1,
    metavar="N",
    help="The intra-op thread count the tuned model will run at (0: every core, onnxruntime's "
    "default). Each trial is timed there, and a recipe the accuracy plan runs times its "
    "whole-model check there too (recipe key threads, written to best.toml) [default: 1].",
)
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for pareto.md/.json/.png, best.toml, best.onnx and the float model's outputs "
    "that every trial reads (reference-outputs.npz) [default: NAME.tune/ "
    "beside NAME.onnx; for a folder of models, one subfolder each].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune_command(
    model: Path,
    calib: Path | None,
    eval_data: Path | None,
    max_drop: str | None,
    threshold: float | None,
    output: Path | None,
    as_json: bool,
    sampler: str,
    **settings: object,
) -> None:
    """Search recipes for the fastest compile of MODEL that keeps an accuracy constraint
    (MODEL a folder: each of its .onnx models, one study each).

    Each trial compiles a recipe (calibration method and percentile, SmoothQuant, rotation,
    weight dtype and block, weight rounding, the plan's budget, ops kept in float from the
    sensitivity ranking), scores it on --eval and times it against the float model. Optuna
    steers the search; the fastest trial meeting the constraint is chosen, its recipe written
    as best.toml (`qgraph compile MODEL --recipe best.toml` reproduces best.onnx).

    \b
    Examples:
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 0.005 --trials 40
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 1% --study tune.db
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 0.01 --ray --workers 2
      qgraph tune models/ --max-drop 0.005 --study tune.db   # NAME.calibration/ etc. beside
    """
    if (max_drop is None) == (threshold is None):
        raise click.UsageError("give one of --max-drop and --threshold")
    constraint = (
        tuning.Constraint.max_drop(max_drop)
        if max_drop is not None
        else tuning.Constraint(threshold, tuning.Bound.THRESHOLD)
    )
    configs = tuning.settings_for(
        model,
        calib,
        eval_data,
        output,
        constraint=constraint,
        sampler=tuning.Sampler(sampler),
        **settings,
    )
    results = [_tune_one(config, as_json, folder=model.is_dir()) for config in configs]
    if as_json:
        echo_json(results if model.is_dir() else results[0])


def _tune_one(config: tuning.TuneSettings, as_json: bool, folder: bool) -> dict[str, object]:
    """Run one study, write its outputs, print its table (unless ``as_json``); its JSON."""
    if folder:
        err.print(printable(f"tuning {config.model}"))
    with err.status("starting") as spinner:
        result = tuning.tune(
            config, progress=_trial_line, status=lambda step: spinner.update(printable(step))
        )
    written = tuning.write_outputs(result, config)
    if not as_json:
        out.print(tuning.pareto_table(result))
    if written.recipe is None:
        err.print("no trial met the constraint: loosen it, or run more trials")
    else:
        err.print(printable(f"wrote {written.recipe} and {written.model}"))
    err.print(printable(f"wrote {written.markdown}, {written.json} and {written.plot}"))
    return tuning.result_json(result)


def _trial_line(report: tuning.TrialReport) -> None:
    """One line per finished trial: n of N, what it measured, the best so far, the ETA."""
    outcome = report.outcome
    if outcome.error is not None:
        what = f"failed: {outcome.error}"
    else:
        verdict = "meets" if report.feasible else "fails"
        what = f"{outcome.speedup:.2f}x, score {outcome.score:.6g} ({verdict})"
    best = report.best
    best_text = "none yet" if best is None else f"trial {best.number}, {best.speedup:.2f}x"
    eta = f"ETA {report.eta_seconds:.0f} s"
    err.print(
        printable(f"trial {report.done}/{report.total}: {what}; best {best_text}; {eta}"),
        soft_wrap=True,
    )
