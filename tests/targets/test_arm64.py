"""arm64: compiled models run in aarch64 onnxruntime (under QEMU, ``qgraph.testing.emulation``)
with all its optimizations, and match the Q/DQ reference, the same model run here with none,
within one quantization step.

Why the comparison cuts the model at its quantized activations: onnxruntime on ARM fuses each
DequantizeLinear -> MatMul/Conv (-> QuantizeLinear) group into an integer kernel (SDOT / SMMLA)
that accumulates exactly in int32, where the reference accumulates dequantized floats. The two
pre-quantization values x_arm and x_ref then differ by float rounding only, but a value close to
a rounding boundary lands one step apart, and from there the difference propagates: the next
layer sees one input one step off, and a 16-bit activation downstream (steps 256 times finer)
moves by tens of its steps. So the quantized activations of the ARM run are returned too
(``verify.expose_quantized``), and the reference recomputes each of them, and each float output,
from the ARM run's own upstream integers (``verify.feed_quantized``). Then, at every quantization
point with step s and zero point z:

    |q_arm - q_ref| <= |x_arm - x_ref| / s + 1 <= 1 + FLOAT32_RTOL * max|q_ref - z|

since float-equivalent computations differ by at most ``FLOAT32_RTOL`` of the tensor's largest
magnitude (``qgraph.verify``), and max|x| / s = max|q - z|. That is one step (under 1.003 for int8,
under 1.66 for int16). Each float output, computed from the same integers, must match to
``FLOAT32_RTOL``. Together: the ARM output is the reference's function of quantized activations
that are each within one step of the reference's rounding.

The tests also check that onnxruntime really used integer kernels: the graph it ran holds
QLinearConv / QGemm / MatMulIntegerToFloat nodes, and the QEMU log of translated code holds the
CPU model's instructions (SDOT for dotprod, SMMLA for i8mm, SVE SMMLA for SVE + i8mm).

They skip, saying why, where no arm64 sysroot is built (``python -m qgraph.testing.emulation
setup``); CI builds one and sets ``QGRAPH_ARM64_REQUIRED=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.options import CompileOptions
from qgraph.recipe import quant_options
from qgraph.testing import emulation

REFERENCE_MODELS = ("reference-cnn", "reference-encoder", "reference-decoder")
ROTATED = "+rotation"
"""A zoo name with this suffix: the model compiled with ``rotate``."""
EVALUATION_BATCHES = 2
# Real models run slowly under QEMU (magika: seconds per row): a few rows, calibrated on a
# few batches, on the dotprod CPU only; the reference models cover every CPU model.
ZOO_ROWS = {"magika": 4, "minilm": 2}
ZOO_CALIBRATION_BATCHES = 2
INTEGER_OPS = frozenset(
    {
        "com.microsoft::QLinearConv",
        "com.microsoft::QGemm",
        "com.microsoft::MatMulIntegerToFloat",
        "com.microsoft::QLinearMatMul",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)
# For each QEMU CPU model: the feature its kernels need, and the instructions that show they ran.
CPUS = {
    emulation.DOTPROD_CPU: ("asimddp", {"sdot", "sdot (by element)"}),
    emulation.I8MM_CPU: ("i8mm", {"smmla"}),
    emulation.SVE_I8MM_CPU: ("svei8mm", {"sve smmla"}),
}


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One zoo model compiled for arm64, in the forms the tests run."""

    path: Path  # as compiled
    exposed: Path  # with every quantized activation as an output too
    reference: verify.QuantizedReference  # cut at the quantized activations
    batches: list[dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Callable[[str], Compiled]:
    """Each zoo model, compiled for arm64 on first use."""
    folder = tmp_path_factory.mktemp("arm64")
    cache: dict[str, Compiled] = {}

    def get(name: str) -> Compiled:
        if name not in cache:
            cache[name] = _compile(name, folder)
        return cache[name]

    return get


def _compile(name: str, folder: Path) -> Compiled:
    zoo_name = name.removesuffix(ROTATED)
    missing = models.get_recipe(zoo_name).missing()
    if missing:
        pytest.skip(f"{zoo_name} needs {', '.join(missing)}: pip install -e '.[zoo]'")
    zoo = models.fetch(zoo_name)
    path = folder / f"{name}.onnx"
    model = qgraph.compile_model(zoo.model, "arm64", output=path, options=_options(name, zoo)).model
    exposed = qgraph.load(path)
    verify.expose_quantized(exposed)
    qgraph.save(exposed, folder / f"{name}.exposed.onnx")
    return Compiled(
        path=path,
        exposed=folder / f"{name}.exposed.onnx",
        reference=verify.QuantizedReference.of(model),
        batches=_evaluation_batches(name, zoo),
    )


def _options(name: str, zoo: models.ZooModel) -> CompileOptions:
    calibration: object = zoo.calibration
    if name in ZOO_ROWS:
        calibration = list(itertools.islice(read_batches(zoo.calibration), ZOO_CALIBRATION_BATCHES))
    rotate = name.endswith(ROTATED)
    return CompileOptions(
        quantization=quant_options(mode="static", calib=calibration, rotate=rotate, budget="none")
    )


def _evaluation_batches(name: str, zoo: models.ZooModel) -> list[dict[str, np.ndarray]]:
    if name not in ZOO_ROWS:
        return list(itertools.islice(read_batches(zoo.evaluation), EVALUATION_BATCHES))
    first = next(read_batches(zoo.evaluation))
    return [{input_name: array[: ZOO_ROWS[name]] for input_name, array in first.items()}]


def _assert_matches_within_one_step(model: Compiled, arm: emulation.EmulatedRun) -> None:
    """See the module doc: each quantized activation within one step of the reference's
    rounding of the same upstream integers, each float output within FLOAT32_RTOL."""
    for feeds, outputs in zip(model.batches, arm.outputs, strict=True):
        assert not model.reference.one_step_mismatches(feeds, outputs)


@pytest.mark.parametrize("cpu", list(CPUS))
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_arm64_matches_the_qdq_reference_within_one_step(sysroot, compiled, name, cpu):
    model = compiled(name)
    arm = emulation.run(model.exposed, model.batches, cpu=cpu, trace=True, sysroot=sysroot)
    feature, instructions = CPUS[cpu]
    assert arm.machine == "aarch64" and feature in arm.cpu_features
    assert INTEGER_OPS & set(arm.optimized_ops), f"no integer kernel in {arm.optimized_ops}"
    assert instructions & set(arm.kernel_instructions), f"ran {arm.kernel_instructions}"
    _assert_matches_within_one_step(model, arm)


@pytest.mark.parametrize(
    "name",
    [
        "magika",
        pytest.param("minilm", marks=pytest.mark.torch),
    ],
)
def test_zoo_model_matches_the_qdq_reference_within_one_step(sysroot, compiled, name):
    model = compiled(name)
    arm = emulation.run(model.exposed, model.batches, trace=True, sysroot=sysroot)
    assert INTEGER_OPS & set(arm.optimized_ops), f"no integer kernel in {arm.optimized_ops}"
    assert CPUS[emulation.DOTPROD_CPU][1] & set(arm.kernel_instructions)
    _assert_matches_within_one_step(model, arm)


def test_a_rotated_model_runs_in_integer_kernels(sysroot, compiled):
    """Rotation's online transforms stay float MatMuls between the integer groups."""
    model = compiled(f"reference-decoder{ROTATED}")
    arm = emulation.run(model.exposed, model.batches, trace=True, sysroot=sysroot)
    assert INTEGER_OPS & set(arm.optimized_ops), f"no integer kernel in {arm.optimized_ops}"
    assert CPUS[emulation.DOTPROD_CPU][1] & set(arm.kernel_instructions)
    _assert_matches_within_one_step(model, arm)


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_exposing_the_quantized_activations_keeps_onnxruntimes_fusions(sysroot, compiled, name):
    model = compiled(name)
    as_compiled = emulation.run(model.path, [], sysroot=sysroot)
    exposed = emulation.run(model.exposed, [], sysroot=sysroot)
    # An exposed activation is an NCHW graph output, so the NHWC layout Transposes around
    # consecutive QLinearConvs stay; every fusion is the same.
    assert _without_transposes(exposed.optimized_ops) == _without_transposes(
        as_compiled.optimized_ops
    )


def _without_transposes(ops: Counter) -> dict[str, int]:
    return {op: count for op, count in ops.items() if op != "Transpose"}


def test_without_optimizations_no_integer_kernel_runs(sysroot, compiled):
    """The control for the instruction counts: the same model, its Q/DQ left unfused."""
    model = compiled("reference-encoder")
    unfused = emulation.run(
        model.path,
        model.batches[:1],
        optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        trace=True,
        sysroot=sysroot,
    )
    assert not INTEGER_OPS & set(unfused.optimized_ops)
    assert not unfused.kernel_instructions
