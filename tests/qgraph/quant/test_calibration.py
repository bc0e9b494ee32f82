"""qgraph.quant.calibration: range methods match hand-computed results, statistics stream
exactly, and collection reads intermediate tensors, leaves the model as it was and names bad
batches."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.data import DatasetInfo, write_dataset
from qgraph.quant.calibration import (
    HISTOGRAM_BINS,
    KL_EPSILON,
    METHODS,
    CalibrationError,
    ChannelStatistics,
    TensorStatistics,
    collect_statistics,
    kl_divergences,
    quantization_errors,
    random_batches,
    sqnr_db,
    tensor_range,
)

WIDTH = 0.001  # bin width of the hand-made histograms below
RANGE = HISTOGRAM_BINS * WIDTH


def _stats(counts: dict[int, int], minimum: float, maximum: float) -> TensorStatistics:
    """Statistics with a hand-made histogram over [0, RANGE]: {bin: count}."""
    stats = TensorStatistics(histogram=True)
    for index, count in counts.items():
        stats.histogram[index] = count
    stats.histogram_range = RANGE
    stats.count = sum(counts.values())
    stats.minimum, stats.maximum = minimum, maximum
    return stats


# Range methods


def test_minmax_is_the_extremes_of_the_finite_elements():
    stats = TensorStatistics()
    stats.update(np.array([[0.25, -1.5], [3.0, 0.0]], dtype=np.float32))
    stats.update(np.array([np.nan, 2.0, -np.inf]))
    assert tensor_range(stats, "minmax") == (-1.5, 3.0)
    assert (stats.count, stats.finite) == (5, False)
    assert stats.histogram is None


def test_percentile_threshold_is_the_upper_edge_of_the_bin_reaching_the_share():
    stats = _stats({0: 90, 9: 9, 2047: 1}, -0.5, RANGE)
    assert tensor_range(stats, "percentile", percentile=90) == pytest.approx((-0.001, 0.001))
    assert tensor_range(stats, "percentile", percentile=99) == pytest.approx((-0.01, 0.01))
    assert tensor_range(stats, "percentile", percentile=99.5) == pytest.approx((-0.5, RANGE))


def test_percentile_bins_hold_their_upper_edge():
    stats = TensorStatistics(histogram=True)
    stats.update(np.arange(1, 101) / 100)  # range 1: 0.5 is the upper edge of bin 1023
    assert tensor_range(stats, "percentile", percentile=50) == (0.01, 0.5)
    assert tensor_range(stats, "percentile", percentile=99) == (0.01, 2028 / 2048)


def test_entropy_keeps_the_fewest_bins_that_quantize_without_loss():
    # Bins 0..300 hold 10 each. From i = 301 on nothing is an outlier and every group's nonzero
    # bins are equal, so Q = P and KL = 0; below, the outliers make P[i-1] differ from Q.
    unsigned = _stats(dict.fromkeys(range(301), 10), 0.0, RANGE)
    assert tensor_range(unsigned, "entropy") == pytest.approx((0.0, 0.301))
    # Two-sided tensors have 128 levels: 128 bins of 10 are exact at i = 128 already.
    signed = _stats(dict.fromkeys(range(128), 10), -1.0, RANGE)
    assert tensor_range(signed, "entropy") == pytest.approx((-0.128, 0.128))


def test_kl_divergence_by_hand():
    # i = 300 of the 301 bins of 10: P = 299 bins of 10 and P[299] = 10 + 10 (outliers),
    # N = 3010; every nonzero bin of h[:300] is 10, so Q = 10 everywhere, C = 3000.
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    counts[:301] = 10
    expected = 299 * (10 / 3010) * math.log((10 / 3010) / (10 / 3000)) + (20 / 3010) * math.log(
        (20 / 3010) / (10 / 3000)
    )
    assert kl_divergences(counts, 256)[300 - 256] == pytest.approx(expected, rel=1e-9)


def _kl_by_definition(counts: np.ndarray, levels: int, kept: int) -> float:
    h = counts.astype(np.float64)
    p = h[:kept].copy()
    p[-1] += h[kept:].sum()
    q = np.zeros(kept)
    for group in np.array_split(np.arange(kept), levels):
        nonzero = group[h[group] > 0]
        if nonzero.size:
            q[nonzero] = h[group].sum() / nonzero.size
    p, q = p / p.sum(), q / q.sum()
    p_filled = p > 0
    q_used = np.where(q[p_filled] > 0, q[p_filled], KL_EPSILON)
    return float(np.sum(p[p_filled] * np.log(p[p_filled] / q_used)))


@pytest.mark.parametrize("levels", [128, 256])
def test_kl_divergences_match_the_definition(levels):
    rng = np.random.default_rng(levels)
    stats = TensorStatistics(histogram=True)
    stats.update(rng.laplace(size=20_000) ** 3)  # a long, sparse tail: empty last bins too
    divergences = kl_divergences(stats.histogram, levels)
    for kept in [levels, levels + 1, 300, 517, 1000, 1500, 2000, 2047, 2048]:
        expected = _kl_by_definition(stats.histogram, levels, kept)
        assert divergences[kept - levels] == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("minimum", "threshold_bins"),
    [
        # 1000 elements in bin 10 (always inside) and one at the centre 2047.5. Clipping at
        # T < 2047.5 costs 1000 T^2 / (12 L^2) + (2047.5 - T)^2, least at
        # T = 2047.5 / (1 + 1000 / (12 L^2)): 2044.9 for L = 256 (uint8; best edge 2045, error
        # 5324.02 vs 5324.82 at 2044) and 2037.1 for L = 128 (int8; 2037: 21215.2 vs 21215.9
        # at 2038); covering it (T = 2048) costs 1001 * 2048^2 / (12 L^2), more.
        (0.0, 2045),
        (-0.5, 2037),
    ],
)
def test_mse_balances_rounding_and_clipping(minimum, threshold_bins):
    stats = _stats({10: 1000, 2047: 1}, minimum, RANGE)
    expected = (max(minimum, -threshold_bins * WIDTH), threshold_bins * WIDTH)
    assert tensor_range(stats, "mse") == pytest.approx(expected)


def test_mse_covers_a_lone_cluster_with_the_nearest_edge():
    # All mass at centre 100.5: T = 101 rounds with error 1000 (101/256)^2 / 12 = 13, any
    # T <= 100 clips by at least 0.5 (error >= 250), and larger T round more coarsely.
    assert tensor_range(_stats({100: 1000}, 0.0, RANGE), "mse") == pytest.approx((0.0, 0.101))


def test_quantization_errors_match_the_definition():
    rng = np.random.default_rng(3)
    stats = TensorStatistics(histogram=True)
    stats.update(rng.standard_normal(10_000))
    h = stats.histogram.astype(np.float64)
    centres = np.arange(HISTOGRAM_BINS) + 0.5
    thresholds = np.arange(1, HISTOGRAM_BINS + 1)[:, None]
    inside = centres <= thresholds
    expected = np.sum(
        np.where(inside, h * (thresholds / 128) ** 2 / 12, h * (centres - thresholds) ** 2), axis=1
    )
    np.testing.assert_allclose(quantization_errors(stats.histogram, 128), expected, rtol=1e-9)


def test_histogram_methods_never_widen_the_minmax_range():
    rng = np.random.default_rng(4)
    stats = TensorStatistics(histogram=True)
    stats.update(rng.standard_cauchy(5_000))
    lo, hi = tensor_range(stats, "minmax")
    for method in ("percentile", "entropy", "mse"):
        method_lo, method_hi = tensor_range(stats, method)
        assert lo <= method_lo < 0 < method_hi <= hi, method


def test_method_table_and_errors():
    assert list(METHODS) == ["minmax", "percentile", "entropy", "mse"]
    assert [m.needs_histogram for m in METHODS.values()] == [False, True, True, True]
    assert tensor_range(TensorStatistics(histogram=True), "entropy") == (0.0, 0.0)
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        tensor_range(TensorStatistics(), "kl")
    with pytest.raises(CalibrationError, match="percentile must be in"):
        tensor_range(TensorStatistics(), "percentile", percentile=120)


# Streaming


def _assert_same_statistics(a: TensorStatistics, b: TensorStatistics) -> None:
    assert (a.count, a.minimum, a.maximum, a.finite) == (b.count, b.minimum, b.maximum, b.finite)
    assert a.histogram_range == b.histogram_range
    np.testing.assert_array_equal(a.histogram, b.histogram)


def test_batches_give_the_statistics_of_their_concatenation():
    rng = np.random.default_rng(5)
    batches = [
        # max |x| 1.5, with values on every bin edge of the range [0, 1.5]
        np.concatenate([np.arange(-2048, 2049) * 1.5 / 2048, rng.uniform(-1.5, 1.5, 999)]),
        rng.uniform(-1.0, 1.0, 500),  # within the range
        np.concatenate([[3.0], rng.uniform(-3.0, 3.0, 700)]),  # grows 2x, to 3
        np.concatenate([[-12.0, np.nan], rng.uniform(-12, 12, 300)]),  # grows 4x, to 12
    ]
    streamed, whole = TensorStatistics(histogram=True), TensorStatistics(histogram=True)
    for batch in batches:
        streamed.update(batch)
    whole.update(np.concatenate(batches))
    _assert_same_statistics(streamed, whole)
    assert streamed.histogram_range == 12.0
    assert streamed.histogram.sum() == streamed.count == 4097 + 999 + 500 + 701 + 301


def test_zeros_first_then_growth_beyond_the_bin_count():
    streamed, whole = TensorStatistics(histogram=True), TensorStatistics(histogram=True)
    batches = [np.zeros((2, 3)), np.array([0.5, -1.0])]
    for batch in batches:
        streamed.update(batch)
    whole.update(np.concatenate([b.ravel() for b in batches]))
    _assert_same_statistics(streamed, whole)

    streamed.update(np.array([5000.0]))  # 8192x: the old histogram merges into bin 0
    assert streamed.histogram_range == 8192.0
    assert streamed.histogram[0] == 8
    assert streamed.histogram[-1] == 0  # 5000 / 4 = 1250 -> bin 1249
    assert streamed.histogram[1249] == 1


# Collection


def _model() -> ir.Model:
    """y = Relu(x) * 2 with x: float[N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])],
        "relu_mul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _feeds(*rows: list[float]) -> dict[str, np.ndarray]:
    return {"x": np.array(rows, dtype=np.float32)}


def test_collection_reads_inputs_intermediates_and_outputs_and_restores_the_model():
    model = _model()
    outputs = list(model.graph.outputs)
    relu = model.graph.node(0).outputs[0]
    batches = [_feeds([-1.0, 0.5, 2.0]), _feeds([3.0, -4.0, 0.0], [1.0, 1.0, 1.0])]
    calls = []
    stats = collect_statistics(
        model,
        {"x": True, "r": True, "y": False},
        batches,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert (stats["x"].minimum, stats["x"].maximum, stats["x"].count) == (-4.0, 3.0, 9)
    assert (stats["r"].minimum, stats["r"].maximum, stats["r"].count) == (0.0, 3.0, 9)
    assert (stats["y"].minimum, stats["y"].maximum, stats["y"].count) == (0.0, 6.0, 9)
    assert stats["r"].histogram.sum() == 9
    assert stats["y"].histogram is None
    assert calls == [(1, None), (2, None)]
    assert list(model.graph.outputs) == outputs
    assert not relu.is_graph_output()


def test_collection_from_a_folder_counts_batches_and_names_files(tmp_path):
    batches = [_feeds([1.0, 2.0, 3.0]), _feeds([np.nan, 0.0, 0.0])]
    write_dataset(tmp_path / "calib", batches, DatasetInfo())
    calls = []
    with pytest.raises(CalibrationError, match=r"^calibration batch 2 \(000001\.npz\), input 'x'"):
        collect_statistics(
            _model(),
            {"r": False},
            tmp_path / "calib",
            progress=lambda done, total: calls.append((done, total)),
        )
    assert calls == [(1, 2)]


def test_a_non_finite_intermediate_is_flagged_not_fatal():
    stats = collect_statistics(_model(), {"y": True}, [_feeds([3e38, 1.0, -1.0])])["y"]
    assert not stats.finite  # 2 * 3e38 overflows float32
    assert (stats.count, stats.minimum, stats.maximum) == (2, 0.0, 2.0)


def test_an_empty_input_beside_others_is_an_empty_cache_and_calibrates():
    """A decoder's prefill feeds its KV cache with no positions yet: [batch, 0]."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["past", "x"], ["c"], axis=1),
         helper.make_node("Relu", ["c"], ["y"])],
        "cached",
        [helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", "P"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    )
    feeds = {"past": np.zeros((1, 0), np.float32), "x": np.array([[-1, 2, 5]], np.float32)}
    stats = collect_statistics(model, {"y": False}, [feeds])
    assert (stats["y"].minimum, stats["y"].maximum) == (0.0, 5.0)
    with pytest.raises(CalibrationError, match=r"input 'past': holds no values \(shape \[0, 0\]"):
        collect_statistics(model, {"y": False}, [{"past": np.zeros((0, 0), np.float32),
                                                  "x": np.zeros((0, 3), np.float32)}])  # fmt: skip


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        (_feeds([np.nan, 1.0, 1.0]), r"^calibration batch 1, input 'x': holds NaN$"),
        (_feeds([np.inf, 1.0, 1.0]), r"^calibration batch 1, input 'x': holds inf$"),
        ({"z": np.zeros(3)}, r"^calibration batch 1: 'z' is not an input of the model"),
        ({}, r"^calibration batch 1: input 'x' is missing \(the batch has: nothing\)$"),
        (
            {"x": np.zeros((1, 3))},
            r"^calibration batch 1, input 'x': dtype float64, expected float32$",
        ),
        (
            {"x": np.zeros((1, 4), np.float32)},
            r"^calibration batch 1, input 'x': shape \[1, 4\], expected \[N,3\]$",
        ),
        (
            {"x": np.zeros((0, 3), np.float32)},
            r"^calibration batch 1, input 'x': holds no values \(shape \[0, 3\]\)$",
        ),
    ],
)
def test_bad_batches_are_named(feeds, message):
    with pytest.raises(CalibrationError, match=message):
        collect_statistics(_model(), {"r": False}, [feeds])


@pytest.mark.parametrize(
    ("tensors", "data", "message"),
    [
        ({"nope": False}, [_feeds([1.0, 1.0, 1.0])], "tensor 'nope' is not a value"),
        ({"two": False}, [_feeds([1.0, 1.0, 1.0])], "tensor 'two' is an initializer"),
        ({"r": False}, [], "the calibration data holds no batches"),
    ],
)
def test_bad_requests_are_named(tensors, data, message):
    model = _model()
    outputs = list(model.graph.outputs)
    with pytest.raises(CalibrationError, match=message):
        collect_statistics(model, tensors, data)
    assert list(model.graph.outputs) == outputs


# Random data


def test_random_batches_match_the_inputs():
    graph = helper.make_graph(
        [],
        "inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, "S"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [4]),
        ],
        [],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    batches = list(random_batches(model, 3, seed=7))
    assert len(batches) == 3
    shapes = {name: (array.shape, array.dtype) for name, array in batches[0].items()}
    assert shapes == {
        "x": ((1, 3), np.float16),
        "ids": ((2, 1), np.int64),
        "mask": ((4,), np.bool_),
    }
    ids = np.concatenate([batch["ids"].ravel() for batch in batches])
    assert ids.min() >= 0 and ids.max() < 100
    again = next(random_batches(model, 1, seed=7))
    np.testing.assert_array_equal(again["x"], batches[0]["x"])


def test_channel_statistics_are_the_per_channel_range_of_all_batches():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((2, 5, 4)) for _ in range(3)]
    stats = ChannelStatistics(axis=-1)
    for batch in batches:
        stats.update(batch)
    rows = np.concatenate([b.reshape(-1, 4) for b in batches])
    np.testing.assert_array_equal(stats.minimum, rows.min(0))
    np.testing.assert_array_equal(stats.absmax, np.abs(rows).max(0))
    assert stats.sample is None and stats.fitted_minimum is None


def test_the_sample_and_the_fitted_range_split_the_units_between_them():
    """Units alternate across batch boundaries: odd ones may be sampled, even ones fit."""
    batches = [np.arange(3 * 4, dtype=np.float32).reshape(3, 4) + 100 * b for b in range(3)]
    stats = ChannelStatistics(axis=-1, sample_size=100)
    for batch in batches:
        stats.update(batch)
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(stats.fitted_maximum, rows[0::2].max(0))
    assert sorted(map(tuple, stats.sample)) == sorted(map(tuple, rows[1::2]))


def test_the_sample_is_a_seeded_uniform_draw_of_images():
    images = np.random.default_rng(4).standard_normal((50, 2, 3, 3)).astype(np.float32)
    first, second = (ChannelStatistics(axis=1, unit_rank=3, sample_size=5) for _ in range(2))
    for stats in (first, second):
        for start in range(0, 50, 10):
            stats.update(images[start : start + 10])
    np.testing.assert_array_equal(first.sample, second.sample)
    assert first.sample.shape == (5, 2, 3, 3)
    np.testing.assert_array_equal(first.fitted_minimum, images[0::2].min(axis=(0, 2, 3)))


def test_channel_statistics_take_batches_that_give_the_fitted_range_no_unit():
    """Odd units go to the sample, even ones to the fitted range, counted over all batches: a
    one-row batch at an odd position leaves the fitted range as it was."""
    stats = ChannelStatistics(axis=-1, unit_rank=1, sample_size=4)
    stats.update(np.array([[1.0, -2.0]]))
    stats.update(np.array([[5.0, 7.0]]))
    np.testing.assert_array_equal(stats.fitted_maximum, [1.0, -2.0])
    np.testing.assert_array_equal(stats.maximum, [5.0, 7.0])
    np.testing.assert_array_equal(stats.sample, [[5.0, 7.0]])


def test_random_batches_give_dynamic_dims_the_size_the_weight_needs():
    """x [N, K] with K dynamic feeds x W, W [64, 8]: K must be 64, N can be 1."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((64, 8), np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    batch = next(random_batches(qgraph.load(proto), 1))
    assert batch["x"].shape == (1, 64)
    verify.run(qgraph.load(proto), batch)


def test_sqnr_db_is_the_energy_ratio_in_decibels():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    assert sqnr_db(0.0, 1.0) == float("-inf")
