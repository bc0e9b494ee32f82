"""Errors qgraph reports to its users.

Every error a user can cause (a bad file, a bad option, a model qgraph cannot handle) is a
``QGraphError`` whose message is one line naming the file, node or tensor at fault. The CLI
prints that line and exits non-zero; anything else escaping is a bug in qgraph.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ONE_LINE_LIMIT = 300
"""Characters of a library's message an error line keeps (onnxruntime's run to ~720)."""


class QGraphError(Exception):
    """Base class of the errors qgraph reports to users."""


class ModelLoadError(QGraphError):
    """The model cannot be read: missing, not ONNX, corrupt, or unsafe external data."""


class OutputError(QGraphError):
    """An output (a model, a drawing, a recipe, a dataset) cannot be written where it was
    asked to go: the path is an input, a folder, not a regular file, or not writable."""


class ModelSaveError(OutputError):
    """The model cannot be written where it was asked to go."""


class UnknownTargetError(QGraphError):
    """No target has the requested name."""


class PipelineError(QGraphError):
    """A pass failed, or a pipeline was assembled wrongly."""


class ConformanceError(QGraphError):
    """The compiled model breaks a rule of its target."""


def not_a_regular_file(path: Path) -> str | None:
    """Why qgraph will not read ``path`` (a FIFO, device or socket would block or never end),
    or None for a regular file, a folder or a missing path."""
    if path.exists() and not path.is_file() and not path.is_dir():
        return f"{path}: not a regular file (a FIFO, device or socket); qgraph reads only files"
    return None


def link_problem(path: Path) -> str | None:
    """Why ``path``, which does not exist to ``Path.exists``, is not simply missing: a symlink
    loop, or a symlink to nothing; None when there is no link at ``path``."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop (the link points, through others, back at itself)"
    if path.is_symlink():
        return f"broken symlink (it points to '{os.readlink(path)}', which does not exist)"
    return None


def one_line(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """``text`` (a library's message, maybe several lines) as one line of at most ``limit``
    characters: lines joined by spaces, runs of blanks collapsed, the rest cut with "..."."""
    joined = " ".join(text.split())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."
