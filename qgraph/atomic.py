"""Replacing a file or a folder whole, or not at all.

The new content is written to a staging path beside the target and renamed over it, so a
failure (or an interruption) leaves the target as it was. Staging names start with a dot and
a clipped form of the target's name, so they stay within the file system's name limit. An
``OSError`` on the way is an ``OutputError`` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qgraph.errors import OutputError

STAGING_NAME_CHARACTERS = 64
"""How much of the target's name a staging name repeats."""


def staging_prefix(target: Path) -> str:
    """The prefix of a staging name for ``target``: hidden, recognizable, never too long."""
    return f".{target.name[:STAGING_NAME_CHARACTERS]}."


@contextlib.contextmanager
def replaced_folder(target: Path) -> Iterator[Path]:
    """A staging folder beside ``target``; when the block succeeds it replaces ``target``.

    If the block raises, the staging folder is removed and ``target`` is left as it was. The
    new folder gets the mode a plain ``mkdir`` would give (``mkdtemp`` makes it 0700).
    """
    with _written(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
        try:
            yield staging
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replaced_file(target: Path) -> Iterator[Path]:
    """A staging path beside ``target``; when the block succeeds it replaces ``target``."""
    with _written(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=staging_prefix(target), dir=target.parent)
        os.close(descriptor)
        staging = Path(name)
        try:
            yield staging
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)


@contextlib.contextmanager
def _written(target: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``target`` into an ``OutputError`` naming it."""
    try:
        yield
    except OSError as error:
        raise OutputError(f"{target}: cannot be written ({error.strerror or error})") from error
