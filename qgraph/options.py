"""What a user can ask of a compile, beyond the model and the target."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qgraph.recipe import QuantOptions
from qgraph.targets import QuantFormat

CalibrationProgress = Callable[[int, "int | None"], None]
"""Told ``(batches done, batches in all or None)`` after each calibration batch."""


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options that shape the pipeline built for a compile.

    Attributes:
        skip_passes: Names of registered passes to leave out (see ``qgraph passes``).
        explain: Passes that can say why they left something alone collect those reasons
            (the fusion pass: near-misses of each rule); costs a second matching run.
        quantization: What to quantize and how; None compiles in float (canonicalize, fuse,
            finalize).
        calibration_progress: Told of each calibration batch (the CLI draws a progress bar).
        format: Q/DQ pairs or QOperator ops; None takes the target's.
    """

    skip_passes: frozenset[str] = frozenset()
    explain: bool = False
    quantization: QuantOptions | None = None
    calibration_progress: CalibrationProgress | None = dataclasses.field(
        default=None, compare=False
    )
    format: QuantFormat | None = None
