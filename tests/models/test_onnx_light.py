"""onnx's light model set (``qgraph.models.onnx_light``): each model compiles for each target,
passes the target's check, runs in onnxruntime with its integer kernels, and matches its Q/DQ
reference within one quantization step (``qgraph.verify.one_step_problems``).

Every candidate is quantized (``budget="none"``): the rules and kernels are under test, not
which ops the plan finds faster on this host. Where each target's output runs:

- x86-avx2: this host's onnxruntime, every optimization on.
- x86-vnni: the same, judged only on a host with VNNI; without it u8 x s8 pair sums saturate
  int16 (``tests/targets/test_x86.py`` shows it), so the comparison skips there, saying so.
- arm64: aarch64 onnxruntime under QEMU (the ``sysroot`` fixture).
- tensorrt: no TensorRT here; its Q/DQ graph runs in onnxruntime's CPU provider, which fuses
  the same Q/DQ groups into integer kernels.

AlexNet, VGG-19 and ZFNet-512 (61 to 143 M parameters, 10 to 30 s a compile) are marked
``slow``, which ``pytest`` leaves out unless asked (``pytest -m slow``);
``benchmarks/corpus.py`` runs them all.
"""

from __future__ import annotations

import pytest

import qgraph
from qgraph import emulation, verify
from qgraph.models import onnx_light
from qgraph.report import quantization_counts
from qgraph.targets import VNNI_FLAGS, host_cpu_flags

LARGE = frozenset({"alexnet", "vgg19", "zfnet512"})
TARGETS = ("x86-avx2", "x86-vnni", "arm64", "tensorrt")

pytestmark = pytest.mark.skipif(
    not onnx_light.available(), reason="this onnx wheel has no backend test data"
)


def _names() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name
        for name in onnx_light.NAMES
    ]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", _names())
def test_light_model_compiles_runs_and_matches_its_qdq_reference(request, name, target):
    calibration = onnx_light.feeds(name, 2, seed=1)
    quantization = qgraph.quant_options(calib=calibration, budget="none")
    result = qgraph.compile_model(
        onnx_light.model(name), target, options=qgraph.CompileOptions(quantization=quantization)
    )
    float_ops = quantization_counts(result.records).left_in_float
    # Only a classifier Conv that writes a graph output may stay float (DenseNet's, on the
    # CPU targets): onnxruntime fuses a Conv only behind an output Q, which would round the
    # model's output.
    writes_an_output = {n.name for n in result.model.graph if n.outputs[0].is_graph_output()}
    assert set(float_ops) <= writes_an_output, float_ops
    runner = _runner(request, target)  # after the compile: x86-vnni compiles on any host
    problems = verify.one_step_problems(result.model, onnx_light.feeds(name, 1, seed=2), runner)
    assert not problems, problems[:5]


def _runner(request: pytest.FixtureRequest, target: str) -> verify.Runner:
    if target == "arm64":
        return emulation.runner(request.getfixturevalue("sysroot"))
    if target == "x86-vnni" and not host_cpu_flags() & VNNI_FLAGS:
        pytest.skip("this host has no VNNI: x86-vnni's u8 x s8 sums saturate here")
    return verify.run_optimized_here
