"""Run a command on this x86 host as it would run on an AVX2-only CPU: no AVX-512, VNNI or AMX.

    python benchmarks/avx2_host.py [--check] -- COMMAND [ARG ...]

Issue 17 asks for figures from a host without VNNI, and a session's host is what it is. A VNNI
CPU can stand in for one where it matters: onnxruntime's MLAS picks its kernels from what the
CPUID instruction reports, and qgraph's ``--target auto`` and timing cache read /proc/cpuinfo.
So the command runs

- with CPUID faulting (``arch_prctl(ARCH_SET_CPUID)``, CPUs listing ``cpuid_fault``) and
  ``cpuid_mask.c`` preloaded, which answers each CPUID with AVX-512, AVX-VNNI and AMX cleared
  (numpy's dispatch sees the same CPU);
- in a private mount namespace where /proc/cpuinfo is a copy without those flags (root only).

What it is not: the same core runs the AVX2 kernels, at its own clocks and with its own caches.
On an Intel core the AVX2 ``vpmaddubsw`` kernel runs u8 x s8 at about 1.9x fp32 (saturating
int16, as on any AVX2 CPU), like the Intel AVX2 CPUs the issue has in mind; a Zen 1 core ran it
at 1.0x (``speed-avx2.md``). Figures taken this way say "AVX2 kernels on <CPU>", not "an AVX2
host".

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
from pathlib import Path

HIDDEN_FLAGS = ("avx512", "avx_vnni", "amx_")
"""/proc/cpuinfo flags hidden: every one starting with these (AVX-512, AVX-VNNI, AMX)."""
MASK_SOURCE = Path(__file__).with_name("cpuid_mask.c")
CHECK = (
    "import numpy._core._multiarray_umath as m, qgraph.targets as t; "
    "seen = sorted(k for k, v in m.__cpu_features__.items() if v and k.startswith('AVX')); "
    "print('numpy sees:', ' '.join(seen)); print('--target auto:', t.detect_host_target().name)"
)


class HostError(Exception):
    """This host cannot run a command as an AVX2-only CPU."""


def masked_cpuinfo(text: str) -> str:
    """``text`` (a /proc/cpuinfo) with the AVX-512, AVX-VNNI and AMX flags taken out."""
    lines = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if key.strip() == "flags" and colon:
            kept = [flag for flag in value.split() if not flag.startswith(HIDDEN_FLAGS)]
            line = f"{key}: {' '.join(kept)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def check_host() -> None:
    """Raise ``HostError`` naming what this host lacks for the mask."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        raise HostError(f"avx2_host.py needs an x86-64 host, not {platform.machine()}")
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split():
        raise HostError("this CPU (or its hypervisor) offers no CPUID faulting (cpuid_fault)")
    if os.geteuid() != 0:
        raise HostError("avx2_host.py bind-mounts /proc/cpuinfo, which needs root")
    for tool in ("gcc", "unshare"):
        if shutil.which(tool) is None:
            raise HostError(f"avx2_host.py needs {tool} on PATH")


def build_mask(folder: Path) -> Path:
    """Compile ``cpuid_mask.c`` into ``folder``; the shared library's path."""
    library = folder / "libcpuid_mask.so"
    unmasked = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    command = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(MASK_SOURCE)]
    if subprocess.run(command, env=unmasked).returncode != 0:
        raise HostError(f"gcc could not compile {MASK_SOURCE}")
    return library


def run_masked(command: list[str]) -> int:
    """Run ``command`` as on an AVX2-only CPU; its exit status."""
    check_host()
    with tempfile.TemporaryDirectory(prefix="avx2-host-") as scratch:
        folder = Path(scratch)
        library = build_mask(folder)
        cpuinfo = folder / "cpuinfo"
        cpuinfo.write_text(masked_cpuinfo(Path("/proc/cpuinfo").read_text()))
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
    parser.add_argument("--check", action="store_true", help="Show what a process would see.")
    parser.add_argument("command", nargs="*", help="The command to run, after '--'.")
    args = parser.parse_args()
    command = [sys.executable, "-c", CHECK] if args.check else args.command
    if not command:
        parser.error("name a command after '--', or pass --check")
    try:
        sys.exit(run_masked(command))
    except HostError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
