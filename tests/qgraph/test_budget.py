"""Budgets as written, what they hold, their errors, and the default a dataset's metric picks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qgraph import planning
from qgraph.budget import (
    COSINE,
    DEFAULT_BUDGETS,
    FIGURES,
    PERPLEXITY_RATIO,
    SQNR,
    TOP1,
    Budget,
    BudgetSyntaxError,
    default_budget,
    parse_budget,
)


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("26", Budget(SQNR, 26.0)),
        (30, Budget(SQNR, 30.0)),
        ("sqnr>=18.5", Budget(SQNR, 18.5)),
        ("top1>=0.995", Budget(TOP1, 0.995)),
        (" cosine >= 0.99 ", Budget(COSINE, 0.99)),
        ("ppl-ratio<=1.03", Budget(PERPLEXITY_RATIO, 1.03)),
    ],
)
def test_budgets_are_read_as_written(text, budget):
    assert parse_budget(text) == budget
    assert parse_budget(budget.text) == budget


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("loose", "expected an output SQNR in dB or NAME>=BOUND"),
        ("speed>=2", "NAME one of sqnr, top1, cosine, ppl-ratio"),
        ("cosine<=0.99", "cosine is bounded as >= NUMBER"),
        ("ppl-ratio>=1.03", "ppl-ratio is bounded as <= NUMBER"),
        ("top1>=lots", "top1 is bounded as >= NUMBER"),
        ("top1>=1.5", r"top-1 agreement bound lies in \[0, 1\]"),
        ("ppl-ratio<=0.9", r"perplexity ratio bound lies in \[1, 100\]"),
        ("nan", "expected an output SQNR in dB or NAME>=BOUND"),
        ("200", r"output SQNR bound lies in \[0, 100\]"),
        (True, "expected a number"),
    ],
)
def test_a_budget_that_cannot_be_read_says_why(text, complaint):
    with pytest.raises(BudgetSyntaxError, match=complaint):
        parse_budget(text)


@pytest.mark.parametrize(
    ("budget", "better", "worse"),
    [
        (Budget(SQNR, 26), 30.0, 20.0),
        (Budget(TOP1, 0.995), 1.0, 0.99),
        (Budget(COSINE, 0.995), 0.999, 0.98),
        (Budget(PERPLEXITY_RATIO, 1.03), 1.01, 1.2),
    ],
)
def test_the_error_grows_as_the_figure_worsens_and_the_bound_splits_them(budget, better, worse):
    assert budget.met(better) and not budget.met(worse)
    assert budget.error(better) < budget.allowed_error < budget.error(worse)
    assert budget.met(budget.bound)


def test_the_errors_follow_the_output_noise_to_first_order():
    """For a small noise ``n`` on a unit signal: SQNR's error is ``N/S`` itself, and one minus
    the cosine is half of it (the plan searches in these units)."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(100_000)
    noise = 0.01 * rng.standard_normal(signal.size)
    ratio = float(noise @ noise / (signal @ signal))
    sqnr = 10 * math.log10(1 / ratio)
    cosine = float(
        signal @ (signal + noise) / np.linalg.norm(signal) / np.linalg.norm(signal + noise)
    )
    assert SQNR.error(sqnr) == pytest.approx(ratio)
    assert COSINE.error(cosine) == pytest.approx(ratio / 2, rel=0.05)


def test_shown_values_read_in_the_figures_units():
    assert str(Budget(SQNR, 26)) == "output SQNR >= 26.0 dB"
    assert str(Budget(TOP1, 0.995)) == "top-1 agreement >= 99.50%"
    assert str(Budget(PERPLEXITY_RATIO, 1.03)) == "perplexity ratio <= 1.030"
    assert set(FIGURES) == {"sqnr", "top1", "cosine", "ppl-ratio"}


@pytest.mark.parametrize("metric", ["top1", "embedding", "causal-lm"])
def test_a_datasets_metric_picks_its_default_budget(tmp_path, metric):
    (tmp_path / "dataset.json").write_text(json.dumps({"metric": metric}))
    assert default_budget(tmp_path) == DEFAULT_BUDGETS[metric]
    assert default_budget(tmp_path / "000000.npz") == DEFAULT_BUDGETS[metric]


def test_data_that_names_no_metric_keeps_an_output_sqnr(tmp_path):
    assert default_budget(tmp_path) == Budget(SQNR, 26.0)
    assert default_budget([{"x": np.zeros(2)}]) == Budget(SQNR, 26.0)
    (tmp_path / "dataset.json").write_text(json.dumps({"metric": "generic"}))
    assert default_budget(tmp_path) == Budget(SQNR, 26.0)


def test_a_share_of_samples_budget_asks_for_rows_that_resolve_it():
    """A top-1 budget of 99.5% on 128 rows allows no flip, so a model at 98.7% passes one
    time in five; on 400 rows a model at the bound shows two."""
    assert Budget(TOP1, 0.995).rows_to_resolve() == 400
    assert Budget(TOP1, 0.9).rows_to_resolve() == 20
    assert Budget(COSINE, 0.995).rows_to_resolve() == 0
    sample = planning.plan_sample([{"x": np.zeros((64, 3), np.float32)}] * 12, rows=400)
    assert len(sample.batches) == 7 and sample.description == "7 calibration batches"
    assert len(planning.plan_sample([{"x": np.zeros((64, 3), np.float32)}] * 12).batches) == 2
