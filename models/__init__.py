"""The model zoo: recipes that produce ONNX models (and, later, their data) into a cache.

``fetch(name)`` runs a recipe once and returns where its files are; ``qgraph models fetch``
does the same from the command line. The cache folder is ``$QGRAPH_CACHE``, or ``qgraph``
under ``$XDG_CACHE_HOME`` (default ``~/.cache``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.model_io import save
from qgraph.models.reference_cnn import build_reference_cnn


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to make one zoo model."""

    name: str
    summary: str
    build: Callable[[], ir.Model]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """Where a fetched zoo model's files are."""

    name: str
    model: Path


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "reference-cnn",
            "ResNet-style CNN (Conv-BN-Relu, residual Add, pooling, Gemm), seeded weights",
            build_reference_cnn,
        ),
    )
}


class UnknownModelError(QGraphError):
    """No zoo recipe has the requested name."""


def cache_dir() -> Path:
    """Where zoo models are kept: ``$QGRAPH_CACHE`` or ``<user cache>/qgraph``."""
    explicit = os.environ.get("QGRAPH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qgraph"


def fetch(name: str, cache: Path | None = None) -> ZooModel:
    """The zoo model ``name``, built into the cache on first use."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UnknownModelError(f"unknown zoo model '{name}'; choose one of: {', '.join(RECIPES)}")
    folder = (cache or cache_dir()) / name
    path = folder / "model.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        save(recipe.build(), path)
    return ZooModel(name, path)
