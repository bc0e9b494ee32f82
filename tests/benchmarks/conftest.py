"""The benchmark scripts are not a package: their tests import them from ``benchmarks/``."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # after the installed packages: a script never shadows one
