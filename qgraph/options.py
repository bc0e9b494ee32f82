"""What a user can ask of a compile, beyond the model and the target."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options that shape the pipeline built for a compile.

    Attributes:
        skip_passes: Names of registered passes to leave out (see ``qgraph passes``).
    """

    skip_passes: frozenset[str] = frozenset()
