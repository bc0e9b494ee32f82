"""Every model compiles for every target, passes the target's check, runs in onnxruntime with
its integer kernels, and matches its Q/DQ reference within one quantization step
(``qgraph.verify.one_step_problems``): the zoo's models, and onnx's light model set
(``qgraph.models.onnx_light``, given seeded weights).

Every candidate is quantized (``budget="none"``): the rules and kernels are under test, not
which ops the plan finds faster on this host. Where each target's output runs:

- x86-avx2 and x86-avx2-u8: this host's onnxruntime, every optimization on.
- x86-vnni: the same, judged only on a host with VNNI; without it u8 x s8 pair sums saturate
  int16 (``tests/targets/test_x86.py`` shows it), so the comparison skips there, saying so.
- arm64: aarch64 onnxruntime under QEMU (the ``sysroot`` fixture).
- tensorrt: no TensorRT here; its Q/DQ graph runs in onnxruntime's CPU provider, which fuses
  the same Q/DQ groups into integer kernels.

Zoo models calibrate on their first two batches and are judged on the first rows of their
first evaluation batch. AlexNet, VGG-19 and ZFNet-512 (61 to 143 M parameters, 10 to 30 s a
compile) and SmolLM2 are marked ``slow``, which ``pytest`` leaves out unless asked (``pytest
-m slow``); ``benchmarks/corpus.py`` runs them all and writes ``benchmarks/corpus.md``.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.models import onnx_light
from qgraph.report import quantization_counts
from qgraph.targets import VNNI_FLAGS, host_cpu_flags
from qgraph.testing import emulation

TARGETS = ("x86-avx2", "x86-avx2-u8", "x86-vnni", "arm64", "tensorrt")
SLOW = frozenset({"alexnet", "vgg19", "zfnet512", "smollm2"})
TORCH = frozenset({"minilm", "smollm2"})
ZOO = models.BENCHMARKED
ZOO_CALIBRATION_BATCHES = 2
EVALUATION_ROWS = 2
MIN_ZOO_QUANTIZED_SHARE = 0.7
"""Of a zoo model's candidates. The rest stay float for a stated reason: on TensorRT the
attention products (both inputs computed), in SmolLM2 the readers of its few massive
activations."""


@dataclasses.dataclass(frozen=True)
class Case:
    source: object
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]


def _case(name: str) -> Case:
    if name in onnx_light.NAMES:
        return Case(
            onnx_light.model(name),
            onnx_light.feeds(name, 2, seed=1),
            onnx_light.feeds(name, 1, seed=2),
        )
    missing = models.get_recipe(name).missing()
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}: pip install -e '.[zoo]'")
    zoo = models.fetch(name)
    calibration = list(itertools.islice(read_batches(zoo.calibration), ZOO_CALIBRATION_BATCHES))
    first = next(read_batches(zoo.evaluation))
    return Case(zoo.model, calibration, [{k: v[:EVALUATION_ROWS] for k, v in first.items()}])


def _names() -> list[object]:
    names = []
    for name in [*ZOO, *onnx_light.NAMES]:
        marks = [pytest.mark.slow] if name in SLOW else []
        marks += [pytest.mark.torch] if name in TORCH else []
        names.append(pytest.param(name, marks=marks))
    return names


@pytest.mark.skipif(not onnx_light.available(), reason="this onnx wheel has no backend test data")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", _names())
def test_model_compiles_runs_and_matches_its_qdq_reference(request, name, target):
    case = _case(name)
    quantization = qgraph.quant_options(calib=case.calibration, budget="none")
    result = qgraph.compile_model(
        case.source, target, options=qgraph.CompileOptions(quantization=quantization)
    )
    _assert_quantized(name, result)
    runner = _runner(request, target)  # after the compile: x86-vnni compiles on any host
    problems = verify.one_step_problems(result.model, case.evaluation, runner)
    assert not problems, problems[:5]


def _assert_quantized(name: str, result: qgraph.CompileResult) -> None:
    counts = quantization_counts(result.records)
    if name in ZOO:
        assert counts.quantized.total() >= MIN_ZOO_QUANTIZED_SHARE * counts.candidates, counts
        return
    # Of a light model, only a classifier Conv that writes a graph output may stay float
    # (DenseNet's, on the CPU targets): onnxruntime fuses a Conv only behind an output Q, which
    # would round the model's output.
    writes_an_output = {n.name for n in result.model.graph if n.outputs[0].is_graph_output()}
    assert set(counts.left_in_float) <= writes_an_output, counts.left_in_float


def _runner(request: pytest.FixtureRequest, target: str) -> verify.Runner:
    if target == "arm64":
        return emulation.runner(request.getfixturevalue("sysroot"))
    if target == "x86-vnni" and not host_cpu_flags() & VNNI_FLAGS:
        pytest.skip("this host has no VNNI: x86-vnni's u8 x s8 sums saturate here")
    return verify.run_optimized_here
