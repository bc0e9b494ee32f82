"""Interleaved timing in onnxruntime: the one way qgraph measures speed while it compiles.

Each model gets a CPU session, at one intra-op thread unless asked, with every graph
optimization on; the models run in turn, run by run, so that a slow spell of the host (a
frequency change, a neighbour's burst) lands on all of them alike, and each one's time is the
median of its runs. Two untimed rounds come first: the first runs pack weights and grow
buffers. Every timing holds the machine's timing lock (``timing_lock``), so two never overlap
on its cores: two compiles at once, or ``qgraph tune``'s parallel trials, take turns at the
clock instead of each timing the other's load.

Timings worth keeping go to a ``TimesFile``, a JSON object of key -> seconds; an entry that is
not a list of positive numbers of the expected length is measured again, never trusted, and a
file that does not parse counts as empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

RUNS = 15
WARMUP_RUNS = 2
"""Untimed rounds before the timed ones: the first run of a session allocates its memory."""
ALL_CORES = 0
"""``intra_op_num_threads`` 0: onnxruntime's default, a thread per core."""
TIMING_LOCK = Path(tempfile.gettempdir()) / "qgraph-timing.lock"
"""One lock file per machine: a timing runs only while holding it."""
SAME_SPEED = 0.03
"""Two timings within this share of each other are the same speed: six timings of each of
SmolLM2's three MatMul shapes (each the median of 15 alternating runs) gave fp32 / int8 ratios
spread over 0.975-1.051 for one shape (AVX2 host, 2026-12-07, a compile running beside), where
u8 kernels run at 0.97-1.08x of fp32."""


def alternating_medians(
    models: list[onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    runs: int = RUNS,
    threads: int = 1,
) -> list[float]:
    """Median seconds of each model on ``feeds`` at ``threads`` intra-op threads
    (``ALL_CORES``: every core), the models run in turn (``interleaved_medians``)."""
    sessions = [timed_session(model, threads) for model in models]
    return interleaved_medians([functools.partial(s.run, None, feeds) for s in sessions], runs)


def interleaved_medians(calls: Sequence[Callable[[], object]], runs: int) -> list[float]:
    """Median seconds of each call, the calls made in turn ``runs`` times after
    ``WARMUP_RUNS`` untimed rounds, holding the machine's timing lock (module docstring)."""
    times: list[list[float]] = [[] for _ in calls]
    with timing_lock():
        for run in range(WARMUP_RUNS + runs):
            for call, record in zip(calls, times, strict=True):
                start = time.perf_counter()
                call()
                if run >= WARMUP_RUNS:
                    record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


@contextlib.contextmanager
def timing_lock(path: Path | None = None) -> Iterator[None]:
    """Hold the machine's timing lock (``TIMING_LOCK`` unless ``path``): one timing at a
    time on its cores. Not reentrant: a timing never calls another. The file is opened
    read-only (``flock`` needs no more), so another user's lock file serves too; where it
    cannot be opened at all, the timing runs unlocked, with a warning."""
    lock = path or TIMING_LOCK
    try:
        handle = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as error:
        logger.warning("timing without the machine's timing lock %s: %s", lock, error)
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def timed_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model`` at ``threads`` intra-op threads, every
    optimization."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def thread_words(threads: int) -> str:
    """``threads`` intra-op threads in words: one thread, every core, N threads."""
    return {1: "one thread", ALL_CORES: "every core"}.get(threads, f"{threads} threads")


class TimesFile:
    """Measured seconds kept in a JSON file by key (module docstring)."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.count = count
        self.entries = self._read()

    def seconds(self, key: str, measure: Callable[[], list[float]]) -> list[float]:
        """The entry at ``key``, or ``measure()``'s, stored, where it is missing or invalid."""
        found = self.entries.get(key)
        if not self._valid(found):
            found = measure()
            self.entries[key] = found
            self._write()
        return found

    def _valid(self, entry: object) -> bool:
        return (
            isinstance(entry, list)
            and len(entry) == self.count
            and all(isinstance(t, float) and t > 0 for t in entry)
        )

    def _read(self) -> dict[str, object]:
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.entries))
            temporary.replace(self.path)
        except OSError as error:
            logger.warning("cannot write the timings file %s: %s", self.path, error)
