"""The AVX2 kernel race: both weight types timed on this host, cached, never trusted stale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qgraph.stopwatch import timed_session
from qgraph.targets import kernel_race
from qgraph.targets.kernel_race import KernelRace


def test_the_race_times_both_weight_types_on_this_host():
    race = kernel_race.run_race(shape=(16, 64, 64), runs=3)
    assert race.signed_seconds > 0 and race.unsigned_seconds > 0


def test_the_products_it_times_are_exact():
    """Each raced model multiplies what it says: worst-case activations (255) by its 7-bit
    weights give numpy's exact product, so the race times the real kernels, not a shortcut."""
    rng = np.random.default_rng(1)
    x = np.full((4, 64), 255, np.uint8)
    for weight_type, zero_point in kernel_race.WEIGHT_ZERO_POINTS.items():
        model = kernel_race._matmul_integer(rng, weight_type, 64, 32)
        weight = np.frombuffer(model.graph.initializer[0].raw_data, weight_type).reshape(64, 32)
        (product,) = timed_session(model).run(None, {"x": x})
        exact = x.astype(np.int64) @ (weight.astype(np.int64) - zero_point)
        np.testing.assert_array_equal(product, exact)


def test_a_race_is_cached_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_race, "run_race", lambda: calls.append(1) or KernelRace(1e-3, 2e-3))
    path = tmp_path / "kernel_race.json"
    assert kernel_race.host_kernel_race(path) == KernelRace(1e-3, 2e-3)
    assert kernel_race.host_kernel_race(path) == KernelRace(1e-3, 2e-3) and len(calls) == 1


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"key": [1e-3]})])
def test_a_corrupt_or_stale_race_is_run_again(tmp_path, monkeypatch, text):
    monkeypatch.setattr(kernel_race, "run_race", lambda: KernelRace(3e-3, 1e-3))
    monkeypatch.setattr(kernel_race, "_host_key", lambda: "key")
    path = tmp_path / "kernel_race.json"
    path.write_text(text)
    assert kernel_race.host_kernel_race(path) == KernelRace(3e-3, 1e-3)
    assert json.loads(path.read_text()) == {"key": [3e-3, 1e-3]}


def test_an_entry_of_another_runtime_or_cpu_is_not_this_hosts(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_race, "run_race", lambda: KernelRace(3e-3, 1e-3))
    path = tmp_path / "kernel_race.json"
    path.write_text(json.dumps({"another host": [1e-3, 1e-3]}))
    assert kernel_race.host_kernel_race(path) == KernelRace(3e-3, 1e-3)
