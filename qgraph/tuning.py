"""``qgraph tune``: search quantization recipes for the fastest model that keeps an accuracy
constraint.

**What is searched** (``SPACE``, data): static-mode recipes, each a choice of the calibration
method (and the percentile kept by ``percentile``), SmoothQuant (off, a fixed alpha, or
``auto``), the Hadamard rotations (on, off), the weights (the target's 8 bits per channel, or
int4 per block of 32, 64 or 128), the weight rounding (nearest, GPTQ), the compile plan's
accuracy budget (the compile's own default, an output SQNR in dB, or none) and an exclusion
set: the first K ops of the per-op sensitivity ranking
(``qgraph.analysis.debugging.debug_accuracy``: each quantized op's error alone at the model's
outputs, measured once per study on the first calibration batch, worst first) kept in float.
The default compile is a point of the space and is the study's first trial, so every tune
reports it beside what it found.

**How a trial is judged**: the recipe is compiled (``compile_model``), its accuracy scored on
the evaluation data by a ``Metric`` (a zoo metric against the float model, or the user's
callable), and its latency measured in onnxruntime at ``threads`` intra-op threads (one unless
asked; a planned recipe's whole-model check times there too, its recipe key ``threads``),
interleaved run by run with the float model (``evaluation.measure_latency``), the median of
``runs``. Timings hold the machine's timing lock (``stopwatch.timing_lock``), so two never
overlap on its cores, whatever runs the trials, nor with the timings each trial's compile takes.
The study (Optuna, multi-objective: speed-up over float, size, score) records the accuracy
constraint as an Optuna constraint, so its sampler (TPE or NSGA-II, seeded) steers to
feasible recipes and its Pareto front (``study.best_trials``) holds feasible ones only. The
chosen trial is the fastest feasible one.

**The constraint** (``Constraint``): a drop from the float model's own score on the
evaluation data, absolute (``0.005``) or relative (``1%``), or a fixed threshold; for a
metric where lower is better (perplexity ratio) a drop is a rise.

**Where trials run**: in this process, in ``workers`` local processes, or as Ray tasks on a
local or remote cluster (``ray_address``); trials are asked and told in batches of
``workers``, in trial order, so that a seed asks the same recipes on any runner for as long as
the sampler samples blind (TPE's first 10 trials, NSGA-II's first generation); after that it
models the measured values, and timing noise can steer two runs apart.
A study in SQLite (``study_path``) resumes: finished trials are kept, and trials a killed run
left unfinished are failed and asked again.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import itertools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from rich.table import Table

from qgraph.analysis.debugging import debug_accuracy
from qgraph.atomic import replaced_file
from qgraph.budget import METRIC_FIGURES
from qgraph.compiler import compile_model
from qgraph.data import read_batches, read_info
from qgraph.errors import QGraphError, one_line
from qgraph.evaluation import (
    METRICS,
    Latency,
    Outputs,
    evaluate,
    evaluation_session,
    measure_latency,
    model_bytes,
    reference_run,
)
from qgraph.graph.model_io import load, model_inputs
from qgraph.graph.patterns import escape
from qgraph.options import CompileOptions
from qgraph.outputs import check_output, dataset_inputs
from qgraph.quant.calibration import checked_batches
from qgraph.recipe import Mode, load_recipe, quant_options
from qgraph.stopwatch import thread_words
from qgraph.targets import QuantFormat, get_target

TUNE_EXTRA = "tune"
RAY_EXTRA = "ray"
SENSITIVITY_ATTR = "sensitivity"
"""The study's user attribute holding the sensitivity ranking (node names, worst first)."""
CONSTRAINT_KEY = "accuracy"
OWNER_ATTR = "owner"
ERROR_ATTR = "error"
LATENCY_ATTR = "latency_s"
FLOAT_LATENCY_ATTR = "float_latency_s"
IDENTITY_BEFORE = {"threads": 1}
"""What a study that predates an identity key tuned: every trial was timed at one thread."""
SENSITIVITY_BATCHES = 1
"""Calibration batches the sensitivity ranking runs on (each op's impact: one run a batch)."""
REFERENCE_OUTPUTS = "reference-outputs.npz"
"""The float model's outputs on ``--eval``, computed once per ``tune`` and read by each trial
instead of running the float model again (in the output folder, beside the trials)."""
REFERENCE_OUTPUTS_MAX_BYTES = 1 << 30
"""Above this (a language model's logits over a large eval set), each trial runs the float
model itself rather than read a file that size."""
OUTPUT_FILES = ("pareto.md", "pareto.json", "pareto.png", "best.toml", "best.onnx")


class TuneError(QGraphError):
    """A tune cannot start or go on: a bad constraint, metric, dataset or cluster."""


def require(module: str, extra: str) -> ModuleType:
    """``module``, imported now; a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TuneError(f"{module} is not installed: pip install 'qgraph[{extra}]'") from None


# The search space ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One categorical choice of the search, asked only ``when`` another took a value."""

    name: str
    choices: tuple[object, ...]
    when: tuple[str, object] | None = None


FIXED_ALPHA = "fixed"
COMPILE_DEFAULT = "default"
"""A choice that leaves its recipe key unsaid: the compile's own default, whatever it is."""
SPACE: tuple[Dimension, ...] = (
    Dimension("calib_method", ("minmax", "percentile", "entropy", "mse")),
    Dimension("percentile", (99.9, 99.99, 99.999), when=("calib_method", "percentile")),
    Dimension("smoothquant", ("none", "auto", FIXED_ALPHA)),
    Dimension("alpha", (0.3, 0.5, 0.7, 0.85), when=("smoothquant", FIXED_ALPHA)),
    Dimension("rotate", (COMPILE_DEFAULT, False, True)),
    Dimension("weight_dtype", ("int8", "int4")),
    Dimension("block_size", (32, 64, 128), when=("weight_dtype", "int4")),
    Dimension("weight_rounding", ("nearest", "gptq")),
    Dimension("budget", (COMPILE_DEFAULT, "none", 20.0, 26.0, 32.0)),
    Dimension("exclude", (0, 1, 2, 4, 8)),
)
"""What a trial chooses; ``exclude`` is how many ops of the sensitivity ranking stay float."""

DEFAULT_POINT: dict[str, object] = {
    "calib_method": "minmax",
    "smoothquant": "auto",
    "rotate": COMPILE_DEFAULT,
    "weight_dtype": "int8",
    "weight_rounding": "nearest",
    "budget": COMPILE_DEFAULT,
    "exclude": 0,
}
"""The default compile (``qgraph compile --calib DATA``) as a point of ``SPACE``."""


def sample(trial: Any, space: Sequence[Dimension] = SPACE) -> dict[str, object]:
    """A point of ``space``, each dimension asked of the Optuna ``trial`` when it applies."""
    point: dict[str, object] = {}
    for dimension in space:
        if dimension.when is None or point.get(dimension.when[0]) == dimension.when[1]:
            point[dimension.name] = trial.suggest_categorical(dimension.name, dimension.choices)
    return point


def recipe_of(
    point: Mapping[str, object], ranking: Sequence[str], calib: Path, threads: int = 1
) -> dict:
    """The recipe table (``qgraph compile --recipe`` keys) of a point of ``SPACE``, for a model
    that will run at ``threads`` intra-op threads."""
    recipe: dict[str, object] = {"mode": Mode.STATIC.value, "calib": str(calib.resolve())}
    recipe["calib_method"] = point["calib_method"]
    if point["calib_method"] == "percentile":
        recipe["percentile"] = point["percentile"]
    smoothing = point["smoothquant"]
    recipe["smoothquant"] = point["alpha"] if smoothing == FIXED_ALPHA else smoothing
    if point["rotate"] != COMPILE_DEFAULT:
        recipe["rotate"] = point["rotate"]
    if point["weight_dtype"] != "int8":
        recipe["weight_dtype"] = point["weight_dtype"]
        recipe["block_size"] = point["block_size"]
    recipe["weight_rounding"] = point["weight_rounding"]
    if point["budget"] != COMPILE_DEFAULT:
        recipe["budget"] = point["budget"]
    excluded = list(ranking[: int(point["exclude"])])
    if excluded:
        recipe["exclude_node"] = [escape(name) for name in excluded]
    if threads != 1 and quant_options(recipe).planned:
        recipe["threads"] = threads
    return recipe


def recipe_toml(recipe: Mapping[str, object], header: Sequence[str] = ()) -> str:
    """``recipe`` as TOML text (its values: strings, numbers, booleans, lists of strings)."""
    lines = [f"# {line}" for line in header]
    lines += [f"{key} = {_toml_value(value)}" for key, value in recipe.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# Accuracy: the metric and the constraint -------------------------------------------------


class Better(str, enum.Enum):
    """Which way a metric's score improves."""

    HIGHER = "higher"
    LOWER = "lower"


@dataclasses.dataclass(frozen=True)
class Metric:
    """How a compiled model's accuracy is scored (plain fields: it travels to workers).

    A zoo metric compares the candidate's outputs with the float model's on the data. A user
    metric, ``callable = "pkg.module:function"``, is called as ``function(model, data)`` with
    the path of an ONNX model and the ``--eval`` data path, and returns a number, higher is
    better (return ``-loss`` for a loss); it is called on the float model too, for the score a
    drop is measured from.
    """

    name: str
    better: Better
    zoo: str | None = None
    callable: str | None = None
    ideal: float | None = None
    """A zoo metric's score of the float model, known without running it."""

    @classmethod
    def named(cls, metric: str | None, data: Path) -> Metric:
        """A zoo metric by name (None: the dataset's own, else generic), or ``pkg.mod:fn``."""
        if metric is not None and ":" in metric:
            _load_callable(metric)
            return cls(metric, Better.HIGHER, callable=metric)
        zoo = metric or read_info(data).metric or "generic"
        if zoo not in METRIC_FIGURES:
            choices = ", ".join([*METRICS, "pkg.module:function"])
            raise TuneError(f"unknown metric '{zoo}'; choose one of: {choices}")
        figure = METRIC_FIGURES[zoo]
        better = Better.HIGHER if figure.higher_is_better else Better.LOWER
        return cls(figure.key, better, zoo=zoo, ideal=figure.perfect)

    def score(
        self,
        reference: Path,
        candidate: Path,
        data: Path,
        reference_outputs: list[Outputs] | None = None,
    ) -> float:
        """``candidate``'s score on ``data``: a number, or a ``TuneError`` naming the metric.
        A zoo metric compares it with ``reference_outputs`` where given, else runs
        ``reference``."""
        if self.callable is not None:
            return _call_metric(self.callable, candidate, data)
        evaluation = evaluate(
            reference, candidate, data, metric=self.zoo, runs=0, reference_outputs=reference_outputs
        )
        return _figure(evaluation.figures, self.name)

    def better_than(self, a: float, b: float) -> bool:
        return a > b if self.better is Better.HIGHER else a < b


def _figure(figures: Mapping[str, float], name: str) -> float:
    """``name`` among an evaluation's ``figures``; ``generic``'s SQNR, reported per output, is
    the lowest of them."""
    if name == "sqnr_db":
        return min(v for k, v in figures.items() if k.endswith(".sqnr_db"))
    return float(figures[name])


def _load_callable(spec: str) -> Callable[..., object]:
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise TuneError(f"--metric {spec}: cannot load it ({one_line(str(error))})") from None
    if not callable(function):
        raise TuneError(f"--metric {spec}: not a callable")
    return function


def _call_metric(spec: str, model: Path, data: Path) -> float:
    try:
        value = _load_callable(spec)(str(model), str(data))
    except TuneError:
        raise
    except Exception as error:
        raise TuneError(
            f"--metric {spec} raised {type(error).__name__}: {one_line(str(error))}"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TuneError(f"--metric {spec} returned {value!r}, not a number")
    return float(value)


class Bound(str, enum.Enum):
    """How a constraint's amount is read."""

    DROP = "drop"
    """At most this much worse than the float model's score."""
    RELATIVE_DROP = "relative drop"
    """At most this fraction of the float model's score worse."""
    THRESHOLD = "threshold"
    """At least this score (at most, where lower is better)."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """The accuracy a chosen model keeps: see ``Bound``."""

    amount: float
    bound: Bound

    @classmethod
    def max_drop(cls, text: str) -> Constraint:
        """``0.005`` (absolute) or ``1%`` (relative to the float model's score)."""
        relative = text.strip().endswith("%")
        try:
            amount = float(text.strip().removesuffix("%"))
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or amount < 0:
            raise TuneError(f"--max-drop {text}: expected a number >= 0, or a percentage (1%)")
        if relative:
            return cls(amount / 100, Bound.RELATIVE_DROP)
        return cls(amount, Bound.DROP)

    def worst(self, baseline: float, metric: Metric) -> float:
        """The worst score allowed, given the float model's ``baseline`` score."""
        if self.bound is Bound.THRESHOLD:
            return self.amount
        if not math.isfinite(baseline):
            raise TuneError(
                f"the float model's {metric.name} against itself is {baseline}: a drop from it "
                "means nothing; give a --threshold instead"
            )
        drop = self.amount * abs(baseline) if self.bound is Bound.RELATIVE_DROP else self.amount
        return baseline - drop if metric.better is Better.HIGHER else baseline + drop

    def describe(self, metric: Metric) -> str:
        if self.bound is Bound.THRESHOLD:
            side = ">=" if metric.better is Better.HIGHER else "<="
            return f"{metric.name} {side} {self.amount:g}"
        amount = f"{self.amount:.2%}" if self.bound is Bound.RELATIVE_DROP else f"{self.amount:g}"
        return f"{metric.name} at most {amount} worse than float"


def violation(score: float, worst: float, metric: Metric) -> float:
    """By how much ``score`` misses ``worst``: 0 or less when it meets it (Optuna's sign)."""
    return worst - score if metric.better is Better.HIGHER else score - worst


# A trial ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrialJob:
    """All a worker needs to run one trial (paths and plain data: it is pickled)."""

    number: int
    recipe: dict
    model: Path
    target: str
    eval_data: Path
    metric: Metric
    runs: int
    folder: Path
    reference_outputs: Path | None = None
    """``REFERENCE_OUTPUTS`` where ``tune`` wrote it, else None (the trial runs the float
    model)."""
    threads: int = 1
    """Intra-op threads the trial is timed at (``stopwatch.ALL_CORES``: every core)."""


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """What a trial measured, or why it failed."""

    number: int
    score: float | None = None
    latency: float | None = None
    float_latency: float | None = None
    size: int | None = None
    error: str | None = None

    @property
    def speedup(self) -> float:
        """Float latency over the candidate's (a completed trial's)."""
        return self.float_latency / self.latency


def run_trial(job: TrialJob) -> TrialOutcome:
    """Compile ``job.recipe``, score it, time it (holding the machine's timing lock)."""
    candidate = job.folder / f"trial-{job.number:04d}.onnx"
    try:
        options = CompileOptions(quantization=quant_options(job.recipe))
        compile_model(job.model, job.target, output=candidate, options=options)
        stored = None if job.reference_outputs is None else read_outputs(job.reference_outputs)
        score = job.metric.score(job.model, candidate, job.eval_data, stored)
        latency = _latency(job.model, candidate, job.eval_data, job.runs, job.threads)
        return TrialOutcome(
            job.number, score, latency.candidate, latency.reference, model_bytes(candidate)
        )
    except QGraphError as error:
        return TrialOutcome(job.number, error=str(error))
    finally:
        for path in job.folder.glob(f"{candidate.name}*"):
            path.unlink()


def write_reference_outputs(settings: TuneSettings, metric: Metric) -> None:
    """The float model's outputs on the eval data, stored once for every trial to read
    (``REFERENCE_OUTPUTS``, found by ``_stored_outputs``); no file where the metric needs none
    or they are too large."""
    path = settings.output / REFERENCE_OUTPUTS
    outputs = reference_run(settings.model, settings.eval_data) if metric.zoo else []
    size = sum(a.nbytes for batch in outputs for a in batch.values())
    if not outputs or size > REFERENCE_OUTPUTS_MAX_BYTES:
        path.unlink(missing_ok=True)
        return
    arrays = {f"{i:05d}/{name}": a for i, batch in enumerate(outputs) for name, a in batch.items()}
    with replaced_file(path) as staging, staging.open("wb") as handle:
        np.savez(handle, **arrays)


def read_outputs(path: Path) -> list[Outputs]:
    """``write_reference_outputs``'s file, batch by batch."""
    batches: dict[str, Outputs] = {}
    with np.load(path) as stored:
        for key in stored.files:
            batch, _, name = key.partition("/")
            batches.setdefault(batch, {})[name] = stored[key]
    return [batches[batch] for batch in sorted(batches)]


def _latency(model: Path, candidate: Path, data: Path, runs: int, threads: int) -> Latency:
    """Float and candidate timed on the first batch of ``data`` at ``threads`` intra-op threads
    (under the timing lock)."""
    first = next(checked_batches([load(model).graph], data, "batch"))
    sessions = (evaluation_session(model, threads), evaluation_session(candidate, threads))
    return measure_latency(sessions, first, runs)


# Runners ------------------------------------------------------------------------------------


class Runner(Protocol):
    """Runs a batch of trials and returns their outcomes in the jobs' order."""

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]: ...

    def close(self) -> None: ...


class InlineRunner:
    """Trials one after another in this process."""

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        return [run_trial(job) for job in jobs]

    def close(self) -> None:
        pass


class ProcessRunner:
    """Trials in ``workers`` local processes (spawned: onnxruntime does not survive fork)."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        return list(self.pool.map(run_trial, jobs))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


LOCAL_RAY = "local"


class RayRunner:
    """Trials as Ray tasks, one CPU each, on the cluster at ``address`` (``local``: a Ray
    started here with ``workers`` CPUs). The model, the data and the output folder (where a
    trial writes its compile) travel as paths, which every node must see (a shared file
    system)."""

    def __init__(self, address: str, workers: int) -> None:
        self.ray = require("ray", RAY_EXTRA)
        local = address == LOCAL_RAY
        try:
            self.ray.init(
                address=None if local else address,
                num_cpus=workers if local else None,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise TuneError(
                f"--ray {address}: cannot reach a Ray cluster there ({one_line(str(error))})"
            ) from None
        self.task = self.ray.remote(num_cpus=1)(run_trial)

    def run(self, jobs: Sequence[TrialJob]) -> list[TrialOutcome]:
        return self.ray.get([self.task.remote(job) for job in jobs])

    def close(self) -> None:
        self.ray.shutdown()


RAY_CONNECT_SECONDS = 5.0
"""How long a cluster's head may take to accept a connection (Ray itself retries for minutes)."""


def _check_reachable(address: str) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) whose head accepts no connection."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == LOCAL_RAY or not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster, or says it found none
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_SECONDS).close()
    except OSError as error:
        raise TuneError(f"--ray {address}: cannot reach a Ray cluster there ({error})") from None


def make_runner(workers: int, ray_address: str | None) -> Runner:
    if ray_address is not None:
        return RayRunner(ray_address, workers)
    return ProcessRunner(workers) if workers > 1 else InlineRunner()


# The search ---------------------------------------------------------------------------------


class Sampler(str, enum.Enum):
    TPE = "tpe"
    NSGA2 = "nsga2"


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """What ``tune`` searches, on what, judged how."""

    model: Path
    calib: Path
    eval_data: Path
    constraint: Constraint
    output: Path
    metric: str | None = None
    target: str = "auto"
    trials: int = 20
    workers: int = 1
    ray_address: str | None = None
    study_path: Path | None = None
    sampler: Sampler = Sampler.TPE
    seed: int = 0
    runs: int = 20
    threads: int = 1
    """Intra-op threads the tuned model will run at (``stopwatch.ALL_CORES``: every core)."""


CALIBRATION_SUFFIX = ".calibration"
EVALUATION_SUFFIX = ".evaluation"
"""Beside ``NAME.onnx``, its datasets ``NAME.calibration/`` and ``NAME.evaluation/``: the
layout ``qgraph models fetch NAME -o NAME.onnx`` writes."""


def settings_for(
    source: Path,
    calib: Path | None,
    eval_data: Path | None,
    output: Path | None,
    **common: Any,
) -> list[TuneSettings]:
    """One study's settings per model: ``source`` itself, or each ``*.onnx`` in the folder
    ``source``. Data not given is the model's own, beside it (``CALIBRATION_SUFFIX``); the
    output folder is ``NAME.tune`` beside the model, or ``output/NAME`` for a folder."""
    models = sorted(source.glob("*.onnx")) if source.is_dir() else [source]
    if not models:
        raise TuneError(f"{source}: a folder with no .onnx model in it")
    configs = []
    for model in models:
        if output is None:
            folder = model.with_name(f"{model.stem}.tune")
        else:
            folder = output / model.stem if source.is_dir() else output
        configs.append(
            TuneSettings(
                model=model,
                calib=calib or _beside(model, CALIBRATION_SUFFIX, "--calib"),
                eval_data=eval_data or _beside(model, EVALUATION_SUFFIX, "--eval"),
                output=folder,
                **common,
            )
        )
    return configs


def _beside(model: Path, suffix: str, flag: str) -> Path:
    data = model.with_suffix(suffix)
    if not data.exists():
        raise TuneError(f"{model}: no {flag} given and no {data} beside it")
    return data


@dataclasses.dataclass(frozen=True)
class TrialRow:
    """One finished trial, as the outputs show it."""

    number: int
    recipe: dict
    score: float | None
    speedup: float | None
    size: int | None
    feasible: bool
    pareto: bool
    error: str | None


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The study's trials, the constraint, and the chosen trial."""

    model: Path
    metric: Metric
    constraint: Constraint
    baseline: float
    worst: float
    rows: list[TrialRow]
    chosen: int | None
    default: int | None
    seconds: float
    threads: int = 1
    """Intra-op threads every trial was timed at."""

    def row(self, number: int | None) -> TrialRow | None:
        return next((row for row in self.rows if row.number == number), None)


@dataclasses.dataclass(frozen=True)
class TrialReport:
    """Told after each trial: the trial, how many of how many are done, the best so far."""

    outcome: TrialOutcome
    feasible: bool
    done: int
    total: int
    best: TrialOutcome | None
    eta_seconds: float


Progress = Callable[[TrialReport], None]


def tune(
    settings: TuneSettings,
    progress: Progress | None = None,
    status: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run (or resume) the study of ``settings`` until it holds ``settings.trials`` finished
    trials; the result, whose chosen recipe and model ``write_outputs`` writes. ``progress``
    is told of each trial, ``status`` of the steps before them."""
    tell = status or (lambda step: None)
    optuna = require("optuna", TUNE_EXTRA)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    if settings.ray_address is not None:
        require("ray", RAY_EXTRA)
        _check_reachable(settings.ray_address)
    check_outputs(settings)
    metric = Metric.named(settings.metric, settings.eval_data)
    tell(f"scoring the float model on {settings.eval_data}")
    baseline = _baseline(settings, metric)
    worst = settings.constraint.worst(baseline, metric)
    if violation(baseline, worst, metric) > 0:
        raise TuneError(
            f"the float model itself scores {metric.name} {baseline:.6g} on "
            f"{settings.eval_data}, which fails {settings.constraint.describe(metric)}: "
            "no quantized model can be expected to meet it"
        )
    study = _study(optuna, settings, metric)
    if SENSITIVITY_ATTR not in study.user_attrs:
        tell("ranking the quantized ops by their error at the outputs (once per study)")
    ranking = _ranking(study, settings)
    tell(f"trials: {len(_finished(optuna, study))} of {settings.trials} done")
    _retry_abandoned(optuna, study)
    settings.output.mkdir(parents=True, exist_ok=True)
    tell(f"running the float model on {settings.eval_data} once, for every trial")
    write_reference_outputs(settings, metric)
    runner = make_runner(settings.workers, settings.ray_address)
    try:
        _search(optuna, study, settings, metric, worst, ranking, runner, progress)
    finally:
        runner.close()
    return _result(optuna, study, settings, metric, baseline, worst, time.perf_counter() - start)


def _baseline(settings: TuneSettings, metric: Metric) -> float:
    """The float model's own score on the eval data; checks that data fits the model."""
    for _ in checked_batches([load(settings.model).graph], settings.eval_data, "--eval batch"):
        pass
    if metric.ideal is not None:
        return metric.ideal
    return metric.score(settings.model, settings.model, settings.eval_data)


def _study(optuna: ModuleType, settings: TuneSettings, metric: Metric) -> Any:
    storage = None
    if settings.study_path is not None:
        storage = f"sqlite:///{settings.study_path.resolve()}"
    score_direction = "maximize" if metric.better is Better.HIGHER else "minimize"
    if settings.sampler is Sampler.NSGA2:
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    study = optuna.create_study(
        storage=storage,
        study_name=settings.model.stem,
        directions=["maximize", "minimize", score_direction],
        sampler=sampler,
        load_if_exists=True,
    )
    with warnings.catch_warnings():  # experimental in Optuna, and only names the columns
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["speedup", "bytes", metric.name])
    identity = {
        "model": str(settings.model.resolve()),
        "metric": metric.name,
        "threads": settings.threads,
    }
    if not study.trials:
        study.enqueue_trial(DEFAULT_POINT)
        for key, value in identity.items():
            study.set_user_attr(key, value)
    for key, value in identity.items():
        tuned = study.user_attrs.get(key, IDENTITY_BEFORE.get(key))
        if tuned != value:
            raise TuneError(
                f"--study {settings.study_path}: its study '{study.study_name}' tuned {key} "
                f"{tuned}, not {value}; give another --study file"
            )
    return study


def _ranking(study: Any, settings: TuneSettings) -> list[str]:
    """The sensitivity ranking (worst op first), measured once and kept in the study."""
    if SENSITIVITY_ATTR in study.user_attrs:
        return study.user_attrs[SENSITIVITY_ATTR]
    options = CompileOptions(
        quantization=quant_options(calib=str(settings.calib), budget="none"),
        format=QuantFormat.QDQ,
    )
    quantized = compile_model(settings.model, get_target(settings.target), options=options)
    reference = load(settings.model)
    batches = itertools.islice(read_batches(settings.calib), SENSITIVITY_BATCHES)
    report = debug_accuracy(
        reference, quantized.model, list(batches), impact_batches=SENSITIVITY_BATCHES
    )
    ranking = [op.node for op in report.ops]
    study.set_user_attr(SENSITIVITY_ATTR, ranking)
    return ranking


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retry_abandoned(optuna: ModuleType, study: Any) -> None:
    """Fail the trials a killed run on this host left running, and ask their recipes again."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get(OWNER_ATTR, "")).partition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finished(optuna: ModuleType, study: Any) -> list[Any]:
    """The trials that count: complete, or failed with an error (not interrupted ones, which
    carry none and whose recipes are asked again)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if t.state is states[0] or ERROR_ATTR in t.user_attrs]


def _search(
    optuna: ModuleType,
    study: Any,
    settings: TuneSettings,
    metric: Metric,
    worst: float,
    ranking: list[str],
    runner: Runner,
    progress: Progress | None,
) -> None:
    """Ask, run and tell trials in batches of ``workers``, in trial order, until the study
    holds ``settings.trials`` finished ones (counting those of other tunes sharing it)."""
    started, ran = time.perf_counter(), 0
    while (done := len(_finished(optuna, study))) < settings.trials:
        batch = [study.ask() for _ in range(min(settings.workers, settings.trials - done))]
        jobs = [_job(trial, settings, metric, ranking) for trial in batch]
        try:
            outcomes = runner.run(jobs)
        except BaseException:
            for trial in batch:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(trial.params)
            raise
        for trial, outcome in zip(batch, outcomes, strict=True):
            feasible = _tell(optuna, study, trial, outcome, worst, metric)
            done, ran = done + 1, ran + 1
            if progress is not None:
                eta = (time.perf_counter() - started) / ran * max(settings.trials - done, 0)
                best = _best_outcome(optuna, study)
                progress(TrialReport(outcome, feasible, done, settings.trials, best, eta))


def _job(trial: Any, settings: TuneSettings, metric: Metric, ranking: list[str]) -> TrialJob:
    trial.set_user_attr(OWNER_ATTR, _owner())
    recipe = recipe_of(sample(trial), ranking, settings.calib, settings.threads)
    return TrialJob(
        trial.number,
        recipe,
        settings.model.resolve(),
        settings.target,
        settings.eval_data.resolve(),
        metric,
        settings.runs,
        settings.output.resolve(),
        _stored_outputs(settings),
        settings.threads,
    )


def _stored_outputs(settings: TuneSettings) -> Path | None:
    """Where ``write_reference_outputs`` stored the float model's outputs, if it did."""
    path = settings.output.resolve() / REFERENCE_OUTPUTS
    return path if path.exists() else None


def _tell(
    optuna: ModuleType, study: Any, trial: Any, outcome: TrialOutcome, worst: float, metric: Metric
) -> bool:
    """Record ``outcome`` in the study; whether it meets the constraint."""
    if outcome.error is not None:
        trial.set_user_attr(ERROR_ATTR, outcome.error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    missed = violation(outcome.score, worst, metric)
    trial.set_constraint(CONSTRAINT_KEY, missed)
    trial.set_user_attr(LATENCY_ATTR, outcome.latency)
    trial.set_user_attr(FLOAT_LATENCY_ATTR, outcome.float_latency)
    study.tell(trial, [outcome.speedup, outcome.size, outcome.score])
    return missed <= 0


def _feasible(trial: Any) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


def _fastest(optuna: ModuleType, study: Any) -> Any | None:
    """The fastest feasible trial (fewer bytes, then lower number, on a tie)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [trial for trial in complete if _feasible(trial)]
    return min(feasible, key=lambda t: (-t.values[0], t.values[1], t.number), default=None)


def _best_outcome(optuna: ModuleType, study: Any) -> TrialOutcome | None:
    trial = _fastest(optuna, study)
    if trial is None:
        return None
    latency = trial.user_attrs[LATENCY_ATTR]
    float_latency = trial.user_attrs[FLOAT_LATENCY_ATTR]
    return TrialOutcome(trial.number, trial.values[2], latency, float_latency, trial.values[1])


def _result(
    optuna: ModuleType,
    study: Any,
    settings: TuneSettings,
    metric: Metric,
    baseline: float,
    worst: float,
    seconds: float,
) -> TuneResult:
    ranking = study.user_attrs[SENSITIVITY_ATTR]
    pareto = {trial.number for trial in study.best_trials}
    rows = []
    for trial in _finished(optuna, study):
        complete = trial.state is optuna.trial.TrialState.COMPLETE
        values = trial.values if complete else (None, None, None)
        rows.append(
            TrialRow(
                trial.number,
                recipe_of(trial.params, ranking, settings.calib, settings.threads),
                values[2],
                values[0],
                None if values[1] is None else int(values[1]),
                complete and _feasible(trial),
                trial.number in pareto,
                trial.user_attrs.get(ERROR_ATTR),
            )
        )
    chosen = _fastest(optuna, study)
    default = next((t.number for t in study.trials if t.params == DEFAULT_POINT), None)
    return TuneResult(
        settings.model,
        metric,
        settings.constraint,
        baseline,
        worst,
        rows,
        None if chosen is None else chosen.number,
        default,
        seconds,
        settings.threads,
    )


# Outputs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Written:
    """The files ``write_outputs`` wrote."""

    recipe: Path | None
    model: Path | None
    markdown: Path
    json: Path
    plot: Path


def write_outputs(result: TuneResult, settings: TuneSettings) -> Written:
    """The Pareto table (Markdown, JSON), the plot, and the chosen recipe and its model (the
    recipe compiled again, as ``qgraph compile MODEL --recipe best.toml`` would)."""
    folder = settings.output
    folder.mkdir(parents=True, exist_ok=True)
    markdown, data, plot, recipe, model = (folder / name for name in OUTPUT_FILES)
    _write(markdown, pareto_markdown(result))
    _write(data, json.dumps(result_json(result), indent=2) + "\n")
    with replaced_file(plot) as staging:
        draw_plot(result, staging)
    chosen = result.row(result.chosen)
    if chosen is None:
        return Written(None, None, markdown, data, plot)
    command = f"qgraph compile {settings.model} --target {settings.target} --recipe {recipe}"
    header = [
        f"qgraph tune: trial {chosen.number}, {_speed(chosen.speedup)} over float, "
        f"{result.metric.name} {chosen.score:.6g} ({result.constraint.describe(result.metric)})",
        f"reproduce: {command}",
    ]
    _write(recipe, recipe_toml(chosen.recipe, header))
    options = CompileOptions(quantization=quant_options(load_recipe(recipe)))
    compile_model(settings.model, settings.target, output=model, options=options)
    return Written(recipe, model, markdown, data, plot)


def _write(path: Path, text: str) -> None:
    with replaced_file(path) as staging:
        staging.write_text(text)


def check_outputs(settings: TuneSettings) -> None:
    """Refuse an output folder whose files would overwrite an input of the tune (the model,
    its data, the datasets), before any work."""
    folder = settings.output
    if folder.exists() and not folder.is_dir():
        raise TuneError(f"{folder}: is a file; qgraph tune writes a folder there")
    datasets = {settings.calib.resolve(), settings.eval_data.resolve()}
    if folder.resolve() in datasets:
        raise TuneError(f"{folder}: is a dataset of the tune; give another output folder")
    if not folder.is_dir():
        return
    read = {
        **model_inputs(load(settings.model)),
        **dataset_inputs(settings.calib, "the calibration data"),
        **dataset_inputs(settings.eval_data, "the evaluation data"),
    }
    for name in (*OUTPUT_FILES, REFERENCE_OUTPUTS):
        check_output(folder / name, read)


def _speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def recipe_summary(recipe: Mapping[str, object]) -> str:
    """The recipe's choices in a few words (calibration data left out)."""
    parts = [recipe["calib_method"]]
    if "percentile" in recipe:
        parts[-1] += f"@{recipe['percentile']}"
    parts.append(f"sq={recipe['smoothquant']}")
    if "rotate" in recipe:
        parts.append("rotate" if recipe["rotate"] else "no-rotate")
    if "weight_dtype" in recipe:
        parts.append(f"{recipe['weight_dtype']}/{recipe['block_size']}")
    if recipe["weight_rounding"] != "nearest":
        parts.append(str(recipe["weight_rounding"]))
    parts.append(f"budget={recipe.get('budget', COMPILE_DEFAULT)}")
    if excluded := recipe.get("exclude_node"):
        parts.append(f"{len(excluded)} excluded")
    return " ".join(str(part) for part in parts)


def shown_rows(result: TuneResult) -> list[TrialRow]:
    """The Pareto front, fastest first, with the default compile's trial too."""
    rows = [row for row in result.rows if row.pareto or row.number == result.default]
    return sorted(rows, key=lambda row: -(row.speedup or 0))


def _mark(result: TuneResult, row: TrialRow) -> str:
    marks = ["chosen" if row.number == result.chosen else ""]
    marks.append("default" if row.number == result.default else "")
    marks.append("" if row.feasible else "fails constraint")
    return ", ".join(mark for mark in marks if mark)


def pareto_markdown(result: TuneResult) -> str:
    lines = [
        f"# qgraph tune: {result.model.name}",
        "",
        f"Constraint: {result.constraint.describe(result.metric)} (float model "
        f"{_score(result.baseline)}, worst allowed {_score(result.worst)}); "
        f"{len(result.rows)} trials in {result.seconds:.0f} s, each timed at "
        f"{thread_words(result.threads)}.",
        "",
        f"| trial | speed-up | size | {result.metric.name} | recipe | |",
        "|---|---|---|---|---|---|",
    ]
    for row in shown_rows(result):
        lines.append(
            f"| {row.number} | {_speed(row.speedup)} | {_bytes(row.size)} | "
            f"{_score(row.score)} | {recipe_summary(row.recipe)} | {_mark(result, row)} |"
        )
    return "\n".join(lines) + "\n"


def result_json(result: TuneResult) -> dict[str, object]:
    """The result as strict JSON data (an infinite SQNR becomes the string "inf")."""
    trials = [dataclasses.asdict(row) for row in result.rows]
    for trial in trials:
        trial["score"] = _finite(trial["score"])
    return {
        "model": str(result.model),
        "metric": result.metric.name,
        "constraint": result.constraint.describe(result.metric),
        "float_score": _finite(result.baseline),
        "worst_allowed": _finite(result.worst),
        "chosen": result.chosen,
        "default": result.default,
        "seconds": result.seconds,
        "trials": trials,
    }


def _finite(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def pareto_table(result: TuneResult) -> Table:
    """The Pareto front as a rich table (fastest first; the default compile's row too)."""
    table = Table(title=f"Pareto front: {result.constraint.describe(result.metric)}")
    for column in ("trial", "speed-up", "size", result.metric.name, "recipe", ""):
        table.add_column(column)
    for row in shown_rows(result):
        table.add_row(
            str(row.number),
            _speed(row.speedup),
            _bytes(row.size),
            _score(row.score),
            recipe_summary(row.recipe),
            _mark(result, row),
        )
    return table


def draw_plot(result: TuneResult, path: Path) -> None:
    """Speed-up against score: every finished trial, the front, the constraint, the choice."""
    require("matplotlib", TUNE_EXTRA)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    measured = [row for row in result.rows if row.speedup is not None]
    for feasible, color, label in ((True, "tab:blue", "meets"), (False, "tab:gray", "fails")):
        rows = [row for row in measured if row.feasible is feasible]
        if rows:
            speedups, scores = [r.speedup for r in rows], [r.score for r in rows]
            axes.scatter(speedups, scores, c=color, s=18, label=f"{label} ({len(rows)})")
    front = sorted((r for r in measured if r.pareto), key=lambda r: r.speedup)
    axes.plot([r.speedup for r in front], [r.score for r in front], c="tab:blue", lw=1)
    axes.axhline(result.worst, color="tab:red", ls="--", label="constraint")
    for number, marker, label in ((result.default, "s", "default"), (result.chosen, "*", "chosen")):
        row = result.row(number)
        if row is not None and row.speedup is not None:
            axes.scatter(
                [row.speedup],
                [row.score],
                marker=marker,
                s=160,
                c="none",
                edgecolors="black",
                label=f"{label} (trial {number})",
            )
    axes.set_xlabel(f"speed-up over float ({thread_words(result.threads)}, median)")
    axes.set_ylabel(result.metric.name)
    axes.set_title(f"qgraph tune: {result.model.name}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    pyplot.close(figure)
