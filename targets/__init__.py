"""The targets registry: every target qgraph compiles for, and host detection for ``auto``."""

from __future__ import annotations

import platform
from collections.abc import Callable

from qgraph.errors import UnknownTargetError
from qgraph.targets.arm import ARM64
from qgraph.targets.host import host_cpu_flags, host_cpu_name, host_description
from qgraph.targets.kernel_race import KernelRace, host_kernel_race
from qgraph.targets.spec import QuantFormat, TargetSpec, Violation
from qgraph.targets.tensorrt import TENSORRT
from qgraph.targets.x86 import X86_AVX2, X86_AVX2_U8, X86_VNNI

TARGETS: dict[str, TargetSpec] = {
    t.name: t for t in (X86_VNNI, X86_AVX2, X86_AVX2_U8, ARM64, TENSORRT)
}
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


def host_targets(
    machine: str | None = None, cpu_flags: frozenset[str] | None = None
) -> tuple[TargetSpec, ...]:
    """The CPU targets whose kernels this host runs: arm64 on aarch64; on x86-64, x86-vnni
    with VNNI, else both AVX2 ones (their weight types take different kernels)."""
    machine = (machine or platform.machine()).lower()
    if machine in ARM_MACHINES:
        return (ARM64,)
    if machine in X86_MACHINES:
        flags = host_cpu_flags() if cpu_flags is None else cpu_flags
        return (X86_VNNI,) if flags & VNNI_FLAGS else (X86_AVX2, X86_AVX2_U8)
    raise UnknownTargetError(
        f"--target auto knows x86-64 and aarch64 hosts, not '{machine}'; name a target"
    )


def detect_host_target(
    machine: str | None = None,
    cpu_flags: frozenset[str] | None = None,
    race: Callable[[], KernelRace] = host_kernel_race,
) -> TargetSpec:
    """The CPU target for this host: arm64 on aarch64, x86-vnni with VNNI; without it
    x86-avx2-u8 where u8 x u8 products run as fast as u8 x s8 (``race``, timed once per
    host and onnxruntime version: ``kernel_race.py``), else x86-avx2."""
    candidates = host_targets(machine, cpu_flags)
    if candidates != (X86_AVX2, X86_AVX2_U8):
        (only,) = candidates
        return only
    return X86_AVX2_U8 if race().unsigned_as_fast else X86_AVX2


def is_host_target(spec: TargetSpec) -> bool:
    """This host's CPU is the one ``spec`` describes, so timings taken here hold for it: an
    onnxruntime CPU target for this host's kernels (x86-vnni compiled on an AVX2-only host is
    not: its u8 x s8 kernels run another way there)."""
    try:
        names = {target.name for target in host_targets()}
    except UnknownTargetError:
        return False
    return spec.kernels.runtime_checked and spec.name in names


def same_arch(arch: str | None, machine: str) -> bool:
    """``arch`` (a target's, ``platform.machine()`` spelling) names ``machine``'s kind."""
    kinds = (ARM_MACHINES, X86_MACHINES)
    return any(arch in kind and machine.lower() in kind for kind in kinds)


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
    "host_targets",
    "is_host_target",
    "same_arch",
]
