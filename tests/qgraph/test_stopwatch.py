"""qgraph.stopwatch: one timing at a time on the machine (its ``TimesFile`` is tested through
the timing cache and the kernel race that keep their times in one)."""

from __future__ import annotations

import itertools
import os
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
    _assert_timings_never_overlap(tmp_path / "lock")


def _assert_timings_never_overlap(lock) -> None:
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with stopwatch.timing_lock(lock):
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


def test_the_lock_file_is_opened_read_only(tmp_path, monkeypatch):
    """``flock`` needs no write access, so another user's lock file (mode 0644) serves too
    (as root, permissions cannot show it: the test checks the open's flags)."""
    opened = []
    real_open = os.open

    def read_only_open(path, flags, *args):
        assert not flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND), "opened for writing"
        opened.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(stopwatch.os, "open", read_only_open)
    _assert_timings_never_overlap(tmp_path / "lock")
    assert opened


def test_a_lock_file_that_cannot_be_opened_times_unlocked_with_a_warning(tmp_path, caplog):
    missing_folder = tmp_path / "absent" / "lock"
    with stopwatch.timing_lock(missing_folder):
        pass
    assert "timing without the machine's timing lock" in caplog.text
