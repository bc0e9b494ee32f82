"""Name patterns: ``--exclude-node``, ``--tensor-dtype`` / ``--tensor-method`` and their recipe
keys, matched against the whole name of a node or tensor with RE2.

The names come from the model, which may be untrusted, and a backtracking engine (Python's
``re``) can take time exponential in a name's length: ``(a+)+$`` against ``"a" * n + "b"`` tries
every one of the ``2^(n-1)`` ways to split the ``a``s before failing, so each character doubles
the time. RE2 (the ``google-re2`` package) simulates the pattern's automaton instead and never
backtracks: a match costs ``O(len(pattern) * len(name))`` whatever the two hold. The price is
that RE2 has no backreferences (``(a)\\1``) and no lookaround (``(?=...)``), which a pattern
over names does not need; such a pattern is refused by name.
"""

from __future__ import annotations

import functools
import re

import re2

from qgraph.errors import QGraphError


class PatternError(QGraphError):
    """A name pattern is not a regular expression RE2 accepts."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own complaint to stderr too
    return options


@functools.lru_cache(maxsize=1024)
def compiled(pattern: str) -> re2._Regexp:
    """``pattern`` compiled by RE2 (once); ``PatternError`` naming it if RE2 refuses it."""
    try:
        return re2.compile(pattern, _options())
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"'{pattern}' is not a regular expression RE2 accepts ({reason}; RE2 has no "
            "backreferences or lookaround)"
        ) from None


def full_match(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches the whole of ``name``, in time linear in ``len(name)``."""
    return compiled(pattern).fullmatch(name) is not None


def escape(name: str) -> str:
    """A pattern matching exactly ``name``: Python's escaping, which RE2 reads alike (it escapes
    only the characters special to either, so ``/layers.0/mlp`` reads ``/layers\\.0/mlp``)."""
    return re.escape(name)
