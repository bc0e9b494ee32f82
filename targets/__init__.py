"""The targets registry: every target qgraph compiles for, and host detection for ``auto``."""

from __future__ import annotations

import platform
from pathlib import Path

from qgraph.errors import UnknownTargetError
from qgraph.targets.arm import ARM64
from qgraph.targets.spec import QuantFormat, TargetSpec, Violation
from qgraph.targets.tensorrt import TENSORRT
from qgraph.targets.x86 import X86_AVX2, X86_VNNI

TARGETS: dict[str, TargetSpec] = {t.name: t for t in (X86_VNNI, X86_AVX2, ARM64, TENSORRT)}
AUTO = "auto"
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
ARM_MACHINES = frozenset({"aarch64", "arm64"})
X86_MACHINES = frozenset({"x86_64", "amd64"})


def get_target(name: str | TargetSpec) -> TargetSpec:
    """The target called ``name`` (``auto`` detects the host); a ``TargetSpec`` passes through."""
    if isinstance(name, TargetSpec):
        return name
    if name == AUTO:
        return detect_host_target()
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join([*TARGETS, AUTO])
        raise UnknownTargetError(f"unknown target '{name}'; choose one of: {known}") from None


def detect_host_target(
    machine: str | None = None, cpu_flags: frozenset[str] | None = None
) -> TargetSpec:
    """The CPU target for this host: arm64 on aarch64, x86-vnni or x86-avx2 by CPU flags."""
    machine = (machine or platform.machine()).lower()
    if machine in ARM_MACHINES:
        return ARM64
    if machine in X86_MACHINES:
        flags = host_cpu_flags() if cpu_flags is None else cpu_flags
        return X86_VNNI if flags & VNNI_FLAGS else X86_AVX2
    raise UnknownTargetError(
        f"--target auto knows x86-64 and aarch64 hosts, not '{machine}'; name a target"
    )


def is_host_target(spec: TargetSpec) -> bool:
    """This host's CPU is the one ``spec`` describes, so timings taken here hold for it: an
    onnxruntime CPU target that ``--target auto`` would pick here (x86-vnni compiled on an
    AVX2-only host is not: its u8 x s8 kernels run another way there)."""
    try:
        host = detect_host_target()
    except UnknownTargetError:
        return False
    return spec.kernels.runtime_checked and host.name == spec.name


def same_arch(arch: str | None, machine: str) -> bool:
    """``arch`` (a target's, ``platform.machine()`` spelling) names ``machine``'s kind."""
    kinds = (ARM_MACHINES, X86_MACHINES)
    return any(arch in kind and machine.lower() in kind for kind in kinds)


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where there is none)."""
    return frozenset(_cpuinfo_field(cpuinfo, {"flags", "Features"}).split())


def host_cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's model name (``platform.processor()`` is often empty on Linux)."""
    return _cpuinfo_field(cpuinfo, {"model name"}) or platform.processor() or "unknown CPU"


def host_description() -> str:
    """``machine (CPU name)``, the line benchmark tables print about where they ran."""
    return f"{platform.machine()} ({host_cpu_name()})"


def _cpuinfo_field(cpuinfo: Path, keys: set[str]) -> str:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return ""


__all__ = [
    "AUTO",
    "TARGETS",
    "QuantFormat",
    "TargetSpec",
    "Violation",
    "detect_host_target",
    "get_target",
    "host_cpu_flags",
    "host_cpu_name",
    "host_description",
    "is_host_target",
    "same_arch",
]
