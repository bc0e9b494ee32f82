"""qgraph tune: the constraint, the search space as recipes, the study (resumed, interrupted,
judged), its outputs, and its bad inputs; on a small classifier built here, a few trials."""

from __future__ import annotations

import importlib.util
import io
import json
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from qgraph import tuning
from qgraph.cli import cli
from qgraph.evaluation import evaluate, evaluation_session
from qgraph.recipe import load_recipe, quant_options
from qgraph.tuning import Better, Bound, Constraint, Metric, TuneError

optuna = pytest.importorskip("optuna")

TARGET = "x86-avx2"
NEEDS_RAY = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install 'qgraph[ray]')",
)


def _classifier() -> onnx.ModelProto:
    """logits = Relu(x @ W1 + b1) @ W2, x [8, 16], 10 classes."""
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.normal(size=(16, 32)).astype(np.float32),
        "b1": rng.normal(size=32).astype(np.float32),
        "W2": rng.normal(size=(32, 10)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Add", ["h", "b1"], ["z"], name="bias1"),
            helper.make_node("Relu", ["z"], ["a"], name="relu1"),
            helper.make_node("MatMul", ["a", "W2"], ["logits"], name="fc2"),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 10])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _dataset(folder: Path, batches: int, seed: int, metric: str | None = None) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(batches):
        np.savez(folder / f"{index:03d}.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    if metric is not None:
        (folder / "dataset.json").write_text(json.dumps({"metric": metric}))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A classifier with calibration and held-out evaluation data (top-1), and a bad batch."""
    root = tmp_path_factory.mktemp("tune")
    onnx.save(_classifier(), root / "model.onnx")
    _dataset(root / "calib", 4, seed=1)
    _dataset(root / "eval", 4, seed=2, metric="top1")
    np.savez(root / "wrong.npz", y=np.zeros((8, 16), np.float32))
    (root / "user_metrics.py").write_text(
        "def raises(model, data):\n    raise ValueError('no labels here')\n\n"
        "def text(model, data):\n    return 'high'\n\n"
        "def float_only(model, data):\n"
        "    if 'trial-' in model:\n        raise RuntimeError('quantized models not welcome')\n"
        "    return 1.0\n"
    )
    return root


@pytest.fixture(autouse=True)
def isolated(zoo: Path, tmp_path: Path, monkeypatch) -> None:
    """Timings cached per test; the user metrics importable."""
    monkeypatch.setenv("QGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(zoo))


def settings(zoo: Path, out: Path, **changes: object) -> tuning.TuneSettings:
    base = {
        "model": zoo / "model.onnx",
        "calib": zoo / "calib",
        "eval_data": zoo / "eval",
        "constraint": Constraint(0.05, Bound.DROP),
        "output": out,
        "target": TARGET,
        "trials": 3,
        "runs": 3,
    }
    return tuning.TuneSettings(**(base | changes))


# The constraint -----------------------------------------------------------------------------

TOP1 = Metric("top1_agreement", Better.HIGHER, zoo="top1", ideal=1.0)
PERPLEXITY = Metric("perplexity_ratio", Better.LOWER, zoo="causal-lm", ideal=1.0)


@pytest.mark.parametrize(
    ("text", "metric", "baseline", "worst"),
    [
        ("0.005", TOP1, 1.0, 0.995),
        ("1%", TOP1, 0.8, 0.792),
        ("0.05", PERPLEXITY, 1.0, 1.05),
        ("10%", PERPLEXITY, 2.0, 2.2),
    ],
)
def test_a_drop_is_read_absolute_or_relative_and_against_the_metric_direction(
    text, metric, baseline, worst
):
    assert Constraint.max_drop(text).worst(baseline, metric) == pytest.approx(worst)


@pytest.mark.parametrize("text", ["-0.1", "lots", "nan%", "inf"])
def test_a_drop_that_is_not_a_non_negative_number_is_refused(text):
    with pytest.raises(TuneError, match=f"--max-drop {text}: expected a number"):
        Constraint.max_drop(text)


def test_a_drop_from_an_infinite_score_asks_for_a_threshold():
    sqnr = Metric.named("generic", Path("no-such-data"))
    with pytest.raises(TuneError, match="give a --threshold"):
        Constraint(1.0, Bound.DROP).worst(float("inf"), sqnr)
    assert Constraint(30.0, Bound.THRESHOLD).worst(float("inf"), sqnr) == 30.0


def test_violation_is_positive_only_when_the_score_misses_the_worst_allowed():
    assert tuning.violation(0.99, 0.995, TOP1) > 0
    assert tuning.violation(0.995, 0.995, TOP1) == 0
    assert tuning.violation(1.06, 1.05, PERPLEXITY) > 0
    assert tuning.violation(1.01, 1.05, PERPLEXITY) < 0


# The search space as recipes ----------------------------------------------------------------


def _points() -> list[dict[str, object]]:
    """The default point, then for each choice of each dimension a point taking it."""
    points = [dict(tuning.DEFAULT_POINT)]
    for dimension in tuning.SPACE:
        for choice in dimension.choices:
            point = dict(tuning.DEFAULT_POINT, **{dimension.name: choice})
            if dimension.when is not None:
                point[dimension.when[0]] = dimension.when[1]
            points.append(point | {"percentile": 99.99, "alpha": 0.5, "block_size": 32})
    return points


def test_every_choice_of_the_space_is_a_recipe_the_compiler_takes_back_from_toml(tmp_path):
    ranking = ["fc1", "fc2/MatMul", "a.b"]
    for number, point in enumerate(_points()):
        recipe = tuning.recipe_of(point, ranking, tmp_path / "calib")
        path = tmp_path / f"{number}.toml"
        path.write_text(tuning.recipe_toml(recipe, ["a comment"]))
        assert quant_options(load_recipe(path)) == quant_options(recipe), point


def test_the_default_point_is_the_default_compile(tmp_path):
    recipe = tuning.recipe_of(tuning.DEFAULT_POINT, [], tmp_path)
    assert quant_options(recipe) == quant_options(calib=str(tmp_path))


def test_exclusions_are_the_first_of_the_ranking_escaped(tmp_path):
    point = dict(tuning.DEFAULT_POINT, exclude=2)
    recipe = tuning.recipe_of(point, ["a.b", "c", "d"], tmp_path)
    assert recipe["exclude_node"] == ["a\\.b", "c"]


@pytest.mark.parametrize(("budget", "planned"), [(tuning.COMPILE_DEFAULT, True), ("none", False)])
def test_a_planned_recipe_times_its_model_at_the_tune_threads(tmp_path, budget, planned):
    """Where no plan runs, the compile has no use for threads and refuses the key."""
    point = dict(tuning.DEFAULT_POINT, budget=budget)
    recipe = tuning.recipe_of(point, [], tmp_path, threads=0)
    assert recipe.get("threads") == (0 if planned else None)
    assert quant_options(recipe).threads == (0 if planned else 1)
    assert "threads" not in tuning.recipe_of(point, [], tmp_path)


def test_a_dimension_is_asked_only_when_its_condition_holds():
    asked = tuning.sample(optuna.trial.FixedTrial(dict(tuning.DEFAULT_POINT)))
    assert asked == tuning.DEFAULT_POINT
    chosen = dict(tuning.DEFAULT_POINT, calib_method="percentile", percentile=99.9)
    assert tuning.sample(optuna.trial.FixedTrial(chosen))["percentile"] == 99.9


# The study ----------------------------------------------------------------------------------


def test_a_tune_writes_a_recipe_that_compile_reproduces_byte_for_byte(zoo, tmp_path):
    config = settings(zoo, tmp_path / "out")
    reports: list[tuning.TrialReport] = []
    result = tuning.tune(config, progress=reports.append)
    written = tuning.write_outputs(result, config)

    assert [r.done for r in reports] == [1, 2, 3] and all(r.total == 3 for r in reports)
    assert result.default == 0 and result.chosen is not None
    chosen = result.row(result.chosen)
    assert chosen.feasible and chosen.score >= result.worst
    assert all(chosen.speedup >= row.speedup for row in result.rows if row.feasible)
    again = tmp_path / "again.onnx"
    compiled = CliRunner().invoke(
        cli, ["compile", str(zoo / "model.onnx"), "-t", TARGET, "--recipe",
              str(written.recipe), "-o", str(again)],
    )  # fmt: skip
    assert compiled.exit_code == 0, compiled.output
    assert again.read_bytes() == written.model.read_bytes()
    data = json.loads(written.json.read_text())
    assert data["chosen"] == result.chosen and len(data["trials"]) == 3
    assert f"| {result.chosen} |" in written.markdown.read_text()
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(tuning.pareto_table(result))
    table = console.export_text()
    assert "chosen" in table and "default" in table
    assert written.plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("limit", [tuning.REFERENCE_OUTPUTS_MAX_BYTES, 0])
def test_trials_read_the_float_outputs_stored_once_unless_too_large(
    zoo, tmp_path, monkeypatch, limit
):
    monkeypatch.setattr(tuning, "REFERENCE_OUTPUTS_MAX_BYTES", limit)
    stored: list[bool] = []

    def spy(*args, reference_outputs=None, **kwargs):
        stored.append(reference_outputs is not None)
        return evaluate(*args, reference_outputs=reference_outputs, **kwargs)

    monkeypatch.setattr(tuning, "evaluate", spy)
    tuning.tune(settings(zoo, tmp_path / "out", trials=2))
    assert stored == [limit > 0] * 2
    assert (tmp_path / "out" / tuning.REFERENCE_OUTPUTS).exists() == (limit > 0)


def test_trials_are_timed_at_the_tune_threads_and_best_toml_keeps_them(zoo, tmp_path, monkeypatch):
    timed: list[int] = []

    def spy(path, threads=1, codec=None):
        timed.append(threads)
        return evaluation_session(path, threads, codec)

    monkeypatch.setattr(tuning, "evaluation_session", spy)
    config = settings(zoo, tmp_path / "out", trials=1, threads=0)
    result = tuning.tune(config)
    written = tuning.write_outputs(result, config)
    assert timed == [0, 0]  # the float model and the trial's
    assert load_recipe(written.recipe)["threads"] == 0


def test_a_study_timed_at_another_thread_count_is_refused(zoo, tmp_path):
    study = tmp_path / "study.db"
    tuning.tune(settings(zoo, tmp_path / "out", trials=1, study_path=study))
    with pytest.raises(TuneError, match=r"its study 'model' tuned threads 1, not 0;"):
        tuning.tune(settings(zoo, tmp_path / "out", trials=2, study_path=study, threads=0))


def test_a_study_resumes_without_repeating_its_finished_trials(zoo, tmp_path):
    study = tmp_path / "study.db"
    first = tuning.tune(settings(zoo, tmp_path / "out", trials=2, study_path=study))
    reports: list[tuning.TrialReport] = []
    second = tuning.tune(
        settings(zoo, tmp_path / "out", trials=3, study_path=study), progress=reports.append
    )
    assert [r.outcome.number for r in reports] == [2]
    assert [row.number for row in second.rows] == [0, 1, 2]
    assert [row.recipe for row in second.rows[:2]] == [row.recipe for row in first.rows]


def test_an_interrupted_trial_is_failed_and_asked_again_on_resume(zoo, tmp_path, monkeypatch):
    study = tmp_path / "study.db"
    real = tuning.run_trial

    def interrupted_second(job: tuning.TrialJob) -> tuning.TrialOutcome:
        if job.number == 1:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(tuning, "run_trial", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(settings(zoo, tmp_path / "out", trials=3, study_path=study))
    monkeypatch.setattr(tuning, "run_trial", real)
    result = tuning.tune(settings(zoo, tmp_path / "out", trials=3, study_path=study))
    trials = optuna.load_study(study_name="model", storage=f"sqlite:///{study}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params, "the interrupted recipe is asked again"
    assert [row.number for row in result.rows] == [0, 2, 3], "interrupted: not counted"


def test_a_metric_failing_on_compiled_models_fails_each_trial_by_name(zoo, tmp_path):
    config = settings(zoo, tmp_path / "out", trials=2, metric="user_metrics:float_only")
    reports: list[tuning.TrialReport] = []
    result = tuning.tune(config, progress=reports.append)
    assert [r.outcome.error for r in reports] == [
        "--metric user_metrics:float_only raised RuntimeError: quantized models not welcome"
    ] * 2
    assert result.chosen is None and len(result.rows) == 2
    assert tuning.write_outputs(result, config).recipe is None


def test_parallel_workers_ask_the_same_recipes_as_one(zoo, tmp_path):
    alone = tuning.tune(settings(zoo, tmp_path / "a", trials=4))
    parallel = tuning.tune(settings(zoo, tmp_path / "b", trials=4, workers=2))
    assert [r.recipe for r in parallel.rows] == [r.recipe for r in alone.rows]


@NEEDS_RAY
def test_ray_runs_the_same_search_as_local_workers(zoo, tmp_path):
    local = tuning.tune(settings(zoo, tmp_path / "a", trials=4, workers=2))
    ray = tuning.tune(settings(zoo, tmp_path / "b", trials=4, workers=2, ray_address="local"))
    assert [r.recipe for r in ray.rows] == [r.recipe for r in local.rows]
    assert all(r.error is None for r in ray.rows)


# Bad input through the command line ---------------------------------------------------------

BAD = [
    ("a constraint the float model cannot meet", "--threshold 1.5",
     "the float model itself scores top1_agreement 1", "fails top1_agreement >= 1.5"),
    ("a metric that raises", "--max-drop 0.01 --metric user_metrics:raises",
     "--metric user_metrics:raises raised ValueError: no labels here"),
    ("a metric returning text", "--max-drop 0.01 --metric user_metrics:text",
     "--metric user_metrics:text returned 'high', not a number"),
    ("a metric that is not there", "--max-drop 0.01 --metric user_metrics:absent",
     "--metric user_metrics:absent: cannot load it"),
    ("eval data not matching the model", "--max-drop 0.01 --eval {dir}/wrong.npz",
     "--eval batch 1 (wrong.npz): 'y' is not an input of the model"),
    ("an unreachable Ray address", "--max-drop 0.01 --ray 127.0.0.1:1",
     "--ray 127.0.0.1:1: cannot reach a Ray cluster there"),
    ("a drop of generic SQNR", "--max-drop 1 --metric generic", "give a --threshold"),
    ("an output folder that is the calibration data", "--max-drop 0.01 -o {dir}/calib",
     "calib: is a dataset of the tune"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "flags", "culprit"),
    [
        pytest.param(name, flags, culprit, marks=[NEEDS_RAY] if "--ray" in flags else [])
        for name, flags, *culprit in BAD
    ],
)
def test_bad_input_is_one_line_naming_it(zoo, tmp_path, name, flags, culprit):
    study = tmp_path / "study.db"
    command = (
        f"tune {zoo}/model.onnx --calib {zoo}/calib --eval {zoo}/eval -t {TARGET} "
        f"-o {tmp_path}/out --study {study} {flags.replace('{dir}', str(zoo))}"
    )
    result = CliRunner().invoke(cli, command.split())
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in culprit:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists() and not study.exists(), "nothing started"


def test_a_tune_needs_exactly_one_constraint(zoo):
    base = ["tune", f"{zoo}/model.onnx", "--calib", f"{zoo}/calib", "--eval", f"{zoo}/eval"]
    for extra in ([], ["--max-drop", "0.01", "--threshold", "0.9"]):
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code == 2
        assert "give one of --max-drop and --threshold" in result.stderr


@pytest.mark.parametrize("zoo_metric", ["top1", "generic"])
def test_a_zoo_metric_knows_the_float_model_score_it_would_measure(zoo, zoo_metric):
    metric = Metric.named(zoo_metric, zoo / "eval")
    model = zoo / "model.onnx"
    assert metric.score(model, model, zoo / "eval") == metric.ideal


def test_a_folder_of_models_is_one_study_each_with_the_data_beside_each(zoo, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        (models / f"{name}.onnx").write_bytes((zoo / "model.onnx").read_bytes())
        _dataset(models / f"{name}.calibration", 2, seed=1)
        _dataset(models / f"{name}.evaluation", 2, seed=2, metric="top1")
    study = tmp_path / "study.db"
    # --max-drop 0.1: one flip among the 16 held-out samples is 0.0625
    result = CliRunner().invoke(
        cli, ["tune", str(models), "--max-drop", "0.1", "--trials", "1", "--runs", "2",
              "-t", TARGET, "--study", str(study), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [Path(r["model"]).name for r in json.loads(result.stdout)] == ["a.onnx", "b.onnx"]
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{study}")]
    assert sorted(names) == ["a", "b"]
    assert (models / "a.tune" / "best.toml").exists() and (models / "b.tune" / "best.toml").exists()


def test_a_model_without_data_given_or_beside_it_is_refused(zoo, tmp_path):
    with pytest.raises(TuneError, match=r"no --eval given and no .*model\.evaluation beside it"):
        tuning.settings_for(zoo / "model.onnx", zoo / "calib", None, None,
                            constraint=Constraint(0.1, Bound.DROP))  # fmt: skip


def test_a_trial_a_killed_run_left_running_is_failed_and_asked_again(zoo, tmp_path):
    study_path = tmp_path / "study.db"
    config = settings(zoo, tmp_path / "out", trials=1, study_path=study_path)
    tuning.tune(config)
    study = optuna.load_study(study_name="model", storage=f"sqlite:///{study_path}")
    study.enqueue_trial(dict(tuning.DEFAULT_POINT, exclude=1))
    killed = study.ask()
    tuning.sample(killed)
    killed.set_user_attr(tuning.OWNER_ATTR, f"{socket.gethostname()}:{2**22 + 1}")  # no such pid
    tuning.tune(settings(zoo, tmp_path / "out", trials=2, study_path=study_path))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params == dict(tuning.DEFAULT_POINT, exclude=1)


def test_a_threshold_on_output_sqnr_tunes_and_writes_strict_json(zoo, tmp_path):
    config = settings(zoo, tmp_path / "out", trials=1, metric="generic",
                      constraint=Constraint(10.0, Bound.THRESHOLD))  # fmt: skip
    result = tuning.tune(config)
    assert result.baseline == float("inf") and result.worst == 10.0
    written = tuning.write_outputs(result, config)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON")

    data = json.loads(written.json.read_text(), parse_constant=refuse)
    score = data["trials"][0]["score"]  # "inf" where the plan kept every op float
    assert data["float_score"] == "inf" and (score == "inf" or score > 10.0)


def test_a_missing_optional_library_names_the_extra_that_installs_it():
    with pytest.raises(
        TuneError, match=r"^no_such_library is not installed: pip install 'qgraph\[ray\]'$"
    ):
        tuning.require("no_such_library", tuning.RAY_EXTRA)


def test_a_study_of_another_model_of_the_same_name_is_refused(zoo, tmp_path):
    study = tmp_path / "study.db"
    tuning.tune(settings(zoo, tmp_path / "out", trials=1, study_path=study))
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    other.write_bytes((zoo / "model.onnx").read_bytes())
    refusal = r"its study 'model' tuned model \S+/tune\d*/model\.onnx, not \S+/other/model\.onnx"
    with pytest.raises(TuneError, match=refusal):
        tuning.tune(settings(zoo, tmp_path / "out", model=other, trials=1, study_path=study))
