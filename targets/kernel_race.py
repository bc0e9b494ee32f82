"""Which weight type multiplies faster on this AVX2 host: ``--target auto``'s pick between
x86-avx2 (s8 weights in 7 bits) and x86-avx2-u8 (u8 weights around 128, full 8 bits).

Without VNNI, onnxruntime's MLAS has two u8-activation kernels:

    u8 x s8: ``vpmaddubsw`` sums pairs of products in int16, so the weights keep 7 bits:
             2 x 255 x 63 = 32130 <= 32767, while 2 x 255 x 127 = 64770 saturates;
    u8 x u8: both operands widened to int16 (``vpmaddwd``): full 8-bit weights, no saturation.

Which is faster depends on the core. On an Intel core running MLAS's AVX2 kernels u8 x s8 ran
1.91-1.93x fp32 and u8 x u8 1.42-1.46x; a Zen 1 EPYC ran both at 1.02-1.08x. Where u8 x u8
runs as fast, full 8-bit weights give 6 dB more weight SQNR for nothing.

The race: ``MatMulInteger`` of ``RACE_SHAPE`` (rows x K x N, SmolLM2's MLP up projection)
with each weight type, one intra-op thread, alternating (``qgraph.stopwatch``). u8 weights
win where their time is within ``SAME_SPEED`` of s8's. The two times are kept in
``<QGRAPH_CACHE>/kernel_race.json`` by onnxruntime version, CPU name and CPU flags; an entry
that is not two positive numbers is measured again, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qgraph.models import cache_dir
from qgraph.stopwatch import SAME_SPEED, TimesFile, alternating_medians
from qgraph.targets.host import host_cpu_flags, host_cpu_name

RACE_SHAPE = (256, 576, 1536)
"""Rows x K x N: SmolLM2's MLP up projection on 256 tokens, 0.26 ms in u8 x s8 on a VNNI
Xeon, about 15 ms on a Zen 1: the race takes well under a second, once per host."""
RACE_RUNS = 15
CACHE_FILE = "kernel_race.json"
WEIGHT_ZERO_POINTS = {np.int8: 0, np.uint8: 128}
"""The race's weight types, s8 first, each with its zero point."""


@dataclasses.dataclass(frozen=True)
class KernelRace:
    """Median seconds of the race's product with s8 and with u8 weights."""

    signed_seconds: float
    unsigned_seconds: float

    @property
    def unsigned_as_fast(self) -> bool:
        return self.unsigned_seconds <= (1 + SAME_SPEED) * self.signed_seconds

    def describe(self) -> str:
        rows, depth, columns = RACE_SHAPE
        winner = "u8 weights" if self.unsigned_as_fast else "s8 weights"
        return (
            f"u8 x s8 {self.signed_seconds * 1e3:.2f} ms, u8 x u8 "
            f"{self.unsigned_seconds * 1e3:.2f} ms ({rows} x {depth} x {columns} MatMulInteger, "
            f"one thread; u8 weights win within {SAME_SPEED:.0%}): {winner}"
        )


def host_kernel_race(cache: Path | None = None) -> KernelRace:
    """This host's race, from the cache where it holds a valid entry, else run and stored."""
    times = TimesFile(cache or cache_dir() / CACHE_FILE, count=2)
    return KernelRace(*times.seconds(_host_key(), lambda: list(dataclasses.astuple(run_race()))))


def run_race(shape: tuple[int, int, int] = RACE_SHAPE, runs: int = RACE_RUNS) -> KernelRace:
    """Time the product with each weight type, alternating run by run."""
    rows, depth, columns = shape
    rng = np.random.default_rng(0)
    activations = {"x": rng.integers(0, 256, (rows, depth), dtype=np.uint8)}
    models = [
        _matmul_integer(rng, weight_type, depth, columns) for weight_type in WEIGHT_ZERO_POINTS
    ]
    signed, unsigned = alternating_medians(models, activations, runs)
    return KernelRace(signed, unsigned)


def _matmul_integer(
    rng: np.random.Generator, weight_type: type, depth: int, columns: int
) -> onnx.ModelProto:
    zero_point = WEIGHT_ZERO_POINTS[weight_type]
    weight = (rng.integers(-63, 64, (depth, columns)) + zero_point).astype(weight_type)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "", "w_zero"], ["y"])],
        "race",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, columns])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(zero_point, weight_type), "w_zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _host_key() -> str:
    text = json.dumps([ort.__version__, host_cpu_name(), sorted(host_cpu_flags())])
    return hashlib.sha256(text.encode()).hexdigest()[:24]
