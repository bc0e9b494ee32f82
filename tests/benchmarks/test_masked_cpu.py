"""``benchmarks/masked_cpu.py``: a command run through it sees the older CPU, onnxruntime too."""

from __future__ import annotations

import subprocess
import sys

import masked_cpu
import numpy as np
import pytest

BENCHMARKS = masked_cpu.MASK_SOURCE.parent

CPUINFO = """processor\t: 0
model name\t: Some Xeon
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_fp16 avx_vnni amx_int8 amx_tile cpuid_fault

processor\t: 1
flags\t\t: avx2 avx512vl avx_vnni
"""


def _flags(cpuinfo: str) -> list[list[str]]:
    return [line.split(":")[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")]


@pytest.mark.parametrize(
    ("cpu", "kept"),
    [
        ("avx2", [["fpu", "avx2", "fma", "cpuid_fault"], ["avx2"]]),
        (
            "avx512-vnni",
            [["fpu", "avx2", "fma", "avx512f", "avx512_vnni", "cpuid_fault"], ["avx2", "avx512vl"]],
        ),
    ],
)
def test_masked_cpuinfo_drops_the_hidden_flags_of_every_cpu(
    cpu: str, kept: list[list[str]]
) -> None:
    masked = masked_cpu.masked_cpuinfo(CPUINFO, masked_cpu.CPUS[cpu])
    assert _flags(masked) == kept
    assert "model name\t: Some Xeon" in masked


def _can_mask() -> str:
    try:
        masked_cpu.check_host()
    except masked_cpu.HostError as error:
        return str(error)
    return ""


U8S8_ERROR = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import numpy as np
from integer_kernels import worst_case_error
from qgraph.targets import detect_host_target
print(detect_host_target().name, worst_case_error(np.uint8, np.int8, 0))
"""


@pytest.mark.skipif(bool(_can_mask()), reason=_can_mask() or "the mask runs here")
def test_onnxruntime_runs_its_avx2_kernels_under_the_mask() -> None:
    """u8 x s8 sums at the top of both ranges saturate int16 in MLAS's AVX2 kernel only, so an
    error proves onnxruntime took the AVX2 path; ``--target auto`` reads the masked flags."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "masked_cpu.py"), "--", sys.executable, "-c", U8S8_ERROR],
        capture_output=True,
        text=True,
        check=True,
    )
    target, error = done.stdout.split()
    assert target in ("x86-avx2", "x86-avx2-u8")  # which one, the kernel race decides
    assert int(error) > np.iinfo(np.int16).max


SEEN = """
import numpy._core._multiarray_umath as m
from qgraph.targets import detect_host_target
print(detect_host_target().name, *sorted(k for k, v in m.__cpu_features__.items() if v))
"""


@pytest.mark.skipif(bool(_can_mask()), reason=_can_mask() or "the mask runs here")
def test_a_vnni_cpu_without_amx_keeps_avx512_vnni_and_loses_what_came_after() -> None:
    """numpy reads CPUID itself: it sees Ice Lake's AVX-512 set and no Sapphire Rapids (FP16)."""
    masked = [sys.executable, str(BENCHMARKS / "masked_cpu.py"), "--cpu", "avx512-vnni", "--"]
    done = subprocess.run(
        [*masked, sys.executable, "-c", SEEN],
        capture_output=True,
        text=True,
        check=True,
    )
    target, *features = done.stdout.split()
    assert target == "x86-vnni"
    assert {"AVX512VNNI", "AVX512_ICL"} <= set(features)
    assert not {"AVX512FP16", "AVX512BF16", "AVX512_SPR"} & set(features)
