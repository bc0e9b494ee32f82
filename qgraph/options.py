"""What a user can ask of a compile, beyond the model and the target."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options that shape the pipeline built for a compile.

    Attributes:
        skip_passes: Names of registered passes to leave out (see ``qgraph passes``).
        explain: Passes that can say why they left something alone collect those reasons
            (the fusion pass: near-misses of each rule); costs a second matching run.
    """

    skip_passes: frozenset[str] = frozenset()
    explain: bool = False
