"""The timing cache: entries by op shape, host and runtime; anything unreadable re-measured."""

from __future__ import annotations

import json

import qgraph
from qgraph import timing

SHAPE = timing.OpShape("MatMul", ((64, 128),), (128, 128), (), False)
TARGET = qgraph.get_target("x86-vnni")


def test_a_measurement_is_cached_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "measure", lambda shape, target: calls.append(1) or (2e-3, 1e-3))
    cache = timing.TimingCache(tmp_path / "timings.json")
    assert cache.seconds(SHAPE, TARGET) == (2e-3, 1e-3)
    again = timing.TimingCache(tmp_path / "timings.json")
    assert again.seconds(SHAPE, TARGET) == (2e-3, 1e-3) and len(calls) == 1


def test_a_corrupt_or_stale_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "measure", lambda shape, target: (3e-3, 1e-3))
    path = tmp_path / "timings.json"
    path.write_text("{not json")
    assert timing.TimingCache(path).seconds(SHAPE, TARGET) == (3e-3, 1e-3)
    path.write_text(json.dumps({SHAPE.key(TARGET): [-1, "x"]}))
    assert timing.TimingCache(path).seconds(SHAPE, TARGET) == (3e-3, 1e-3)


def test_the_key_names_the_types_and_the_runtime():
    avx2 = qgraph.get_target("x86-avx2")  # uint8 weights: another kernel
    assert SHAPE.key(TARGET) != SHAPE.key(avx2)
    assert SHAPE.key(TARGET) == timing.OpShape(*timing.dataclasses.astuple(SHAPE)).key(TARGET)


def test_both_twins_run_and_time():
    float_seconds, int8_seconds = timing.measure(SHAPE, TARGET)
    assert float_seconds > 0 and int8_seconds > 0
    conv = timing.OpShape(
        "Conv",
        ((1, 8, 12, 12),),
        (16, 8, 3, 3),
        (("kernel_shape", "[3, 3]"), ("pads", "[1, 1, 1, 1]")),
        True,
    )
    assert all(seconds > 0 for seconds in timing.measure(conv, TARGET))
