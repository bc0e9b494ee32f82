"""Run a command on this x86 host as it would run on an older CPU: AVX2 only, or VNNI without AMX.

    python benchmarks/masked_cpu.py [--cpu avx2|avx512-vnni] [--check] -- COMMAND [ARG ...]

Issue 17 asks for figures from a host without VNNI and from hosts with VNNI, and a session's host
is what it is. A newer CPU can stand in for an older one where it matters: onnxruntime's MLAS
picks its kernels from what the CPUID instruction reports, and qgraph's ``--target auto`` and
timing cache read /proc/cpuinfo. So the command runs

- with CPUID faulting (``arch_prctl(ARCH_SET_CPUID)``, CPUs listing ``cpuid_fault``) and
  ``cpuid_mask.c`` preloaded, which answers each CPUID with the CPU's newer features cleared
  (numpy's dispatch sees the same CPU);
- in a private mount namespace where /proc/cpuinfo is a copy without those flags (root only).

The CPUs (``--cpu``):

- ``avx2`` (the default): no AVX-512, VNNI or AMX. On an Intel core the AVX2 ``vpmaddubsw``
  kernel runs u8 x s8 at about 1.9x fp32 (saturating int16, as on any AVX2 CPU), like the
  Intel AVX2 CPUs issue 17 has in mind; a Zen 1 core ran it at 1.0x (``speed-avx2.md``).
- ``avx512-vnni``: AVX-512 with VNNI but no AMX, AVX-VNNI, AVX512-BF16 or FP16, an Ice Lake or
  Cascade Lake Xeon. On a Xeon with AMX, MLAS's u8 x s8 GEMM runs on the tiles at 4-7x fp32;
  without them its AVX512-VNNI kernel ran 3.1-3.5x, near the 3.3-4.0x the VNNI hosts of the
  issues measured.

What it is not: the same core runs the older kernels, at its own clocks and with its own
caches. Figures taken this way say whose kernels ran on which CPU ("AVX2 kernels on a Xeon"),
not "an AVX2 host".

``--check`` prints what a Python process run this way sees. A program that installs its own
SIGSEGV handler and then executes CPUID crashes under the mask: Python's faulthandler (run
pytest with ``-p no:faulthandler``), gcc's cc1, Ray's servers, Chromium.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MaskedCpu:
    """An older CPU a newer one stands in for: what it hides from CPUID and /proc/cpuinfo."""

    hidden_flags: tuple[str, ...]
    """/proc/cpuinfo flags hidden: every one starting with one of these."""
    define: str
    """The macro that selects this CPU's CPUID masks in ``cpuid_mask.c``."""


CPUS = {
    "avx2": MaskedCpu(("avx512", "avx_vnni", "amx_"), "HIDE_AVX512"),
    "avx512-vnni": MaskedCpu(("avx512_bf16", "avx512_fp16", "avx_vnni", "amx_"), "HIDE_AMX"),
}
MASK_SOURCE = Path(__file__).with_name("cpuid_mask.c")
CHECK = (
    "import numpy._core._multiarray_umath as m, qgraph.targets as t; "
    "seen = sorted(k for k, v in m.__cpu_features__.items() if v and k.startswith('AVX')); "
    "print('numpy sees:', ' '.join(seen)); print('--target auto:', t.detect_host_target().name)"
)


class HostError(Exception):
    """This host cannot run a command as an older CPU."""


def masked_cpuinfo(text: str, cpu: MaskedCpu) -> str:
    """``text`` (a /proc/cpuinfo) with the flags ``cpu`` hides taken out."""
    lines = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if key.strip() == "flags" and colon:
            kept = [flag for flag in value.split() if not flag.startswith(cpu.hidden_flags)]
            line = f"{key}: {' '.join(kept)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def check_host() -> None:
    """Raise ``HostError`` naming what this host lacks for a mask."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        raise HostError(f"masked_cpu.py needs an x86-64 host, not {platform.machine()}")
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split():
        raise HostError("this CPU (or its hypervisor) offers no CPUID faulting (cpuid_fault)")
    if os.geteuid() != 0:
        raise HostError("masked_cpu.py bind-mounts /proc/cpuinfo, which needs root")
    for tool in ("gcc", "unshare"):
        if shutil.which(tool) is None:
            raise HostError(f"masked_cpu.py needs {tool} on PATH")


def build_mask(folder: Path, cpu: MaskedCpu) -> Path:
    """Compile ``cpuid_mask.c`` for ``cpu`` into ``folder``; the shared library's path."""
    library = folder / "libcpuid_mask.so"
    unmasked = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    command = ["gcc", "-O2", "-shared", "-fPIC", f"-D{cpu.define}", "-o", str(library)]
    command.append(str(MASK_SOURCE))
    if subprocess.run(command, env=unmasked).returncode != 0:
        raise HostError(f"gcc could not compile {MASK_SOURCE}")
    return library


def run_masked(command: list[str], cpu: MaskedCpu) -> int:
    """Run ``command`` as on ``cpu``; its exit status."""
    check_host()
    with tempfile.TemporaryDirectory(prefix="masked-cpu-") as scratch:
        folder = Path(scratch)
        library = build_mask(folder, cpu)
        cpuinfo = folder / "cpuinfo"
        cpuinfo.write_text(masked_cpuinfo(Path("/proc/cpuinfo").read_text(), cpu))
        env = {**os.environ, "LD_PRELOAD": str(library)}
        env.pop("PYTHONFAULTHANDLER", None)
        mount_then_run = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
        shell = ["sh", "-c", mount_then_run, str(cpuinfo), *command]
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", *shell], env=env)
        return done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", choices=CPUS, default="avx2", help="The CPU to run as.")
    parser.add_argument("--check", action="store_true", help="Show what a process would see.")
    parser.add_argument("command", nargs="*", help="The command to run, after '--'.")
    args = parser.parse_args()
    command = [sys.executable, "-c", CHECK] if args.check else args.command
    if not command:
        parser.error("name a command after '--', or pass --check")
    try:
        sys.exit(run_masked(command, CPUS[args.cpu]))
    except HostError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
