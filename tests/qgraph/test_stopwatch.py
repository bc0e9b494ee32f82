"""qgraph.stopwatch: one timing at a time on the machine (its ``TimesFile`` is tested through
the timing cache and the kernel race that keep their times in one)."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
from onnx import TensorProto, helper

from qgraph import stopwatch


def _identity():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_timings_never_overlap(tmp_path):
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with stopwatch.timing_lock(tmp_path / "lock"):
            start = time.perf_counter()
            time.sleep(0.05)
            spans.append((start, time.perf_counter()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_a_timing_waits_for_the_lock(tmp_path, monkeypatch):
    """The compile's own timings (each op, the whole model, the Softmax floor, the kernel
    race) take the machine's lock too: a timing started while another holds it runs after."""
    lock = tmp_path / "lock"
    monkeypatch.setattr(stopwatch, "TIMING_LOCK", lock)
    held, finished = threading.Event(), []

    def hold() -> None:
        with stopwatch.timing_lock(lock):
            held.set()
            time.sleep(0.2)
            finished.append(time.perf_counter())

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    stopwatch.alternating_medians([_identity()], {"x": np.zeros(4, np.float32)}, runs=1)
    timed = time.perf_counter()
    holder.join()
    assert finished and finished[0] <= timed
