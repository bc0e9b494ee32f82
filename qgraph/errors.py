"""Errors qgraph reports to its users.

Every error a user can cause (a bad file, a bad option, a model qgraph cannot handle) is a
``QGraphError`` whose message is one line naming the file, node or tensor at fault. The CLI
prints that line and exits non-zero; anything else escaping is a bug in qgraph.
"""

from __future__ import annotations


class QGraphError(Exception):
    """Base class of the errors qgraph reports to users."""


class ModelLoadError(QGraphError):
    """The model cannot be read: missing, not ONNX, corrupt, or unsafe external data."""


class ModelSaveError(QGraphError):
    """The model cannot be written where it was asked to go."""


class UnknownTargetError(QGraphError):
    """No target has the requested name."""


class PipelineError(QGraphError):
    """A pass failed, or a pipeline was assembled wrongly."""


class ConformanceError(QGraphError):
    """The compiled model breaks a rule of its target."""
