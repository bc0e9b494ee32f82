"""``benchmarks/avx2_host.py``: a command run through it sees an AVX2-only CPU, onnxruntime too."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("avx2_host", BENCHMARKS / "avx2_host.py")
avx2_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(avx2_host)

CPUINFO = """processor\t: 0
model name\t: Some Xeon
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile cpuid_fault

processor\t: 1
flags\t\t: avx2 avx512vl avx_vnni
"""


def test_masked_cpuinfo_drops_avx512_vnni_and_amx_flags_of_every_cpu() -> None:
    masked = avx2_host.masked_cpuinfo(CPUINFO)
    flags = [line.split(":")[1].split() for line in masked.splitlines() if line.startswith("flags")]
    assert flags == [["fpu", "sse2", "avx", "avx2", "fma", "cpuid_fault"], ["avx2"]]
    assert "model name\t: Some Xeon" in masked


def _can_mask() -> str:
    try:
        avx2_host.check_host()
    except avx2_host.HostError as error:
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
        [sys.executable, str(BENCHMARKS / "avx2_host.py"), "--", sys.executable, "-c", U8S8_ERROR],
        capture_output=True,
        text=True,
        check=True,
    )
    target, error = done.stdout.split()
    assert target in ("x86-avx2", "x86-avx2-u8")  # which one, the kernel race decides
    assert int(error) > np.iinfo(np.int16).max
