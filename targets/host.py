"""What this host's CPU is, read from ``/proc/cpuinfo``: its feature flags and model name."""

from __future__ import annotations

import platform
from pathlib import Path


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
