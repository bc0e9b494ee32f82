"""qgraph.models: fetch builds once, atomically, per recipe version; says what is missing."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph import models
from qgraph.data import DatasetInfo, write_dataset
from qgraph.models import Recipe, ZooError


def _tiny_build(folder):
    (folder / "model.onnx").write_bytes(b"stand-in")
    for part in ("calibration", "evaluation"):
        write_dataset(folder / part, [{"x": np.zeros(1)}], DatasetInfo("generic"))


@pytest.fixture
def fake_recipes(monkeypatch):
    built = []

    def build(folder):
        built.append(folder)
        _tiny_build(folder)

    def broken(folder):
        (folder / "model.onnx").write_bytes(b"half")
        raise RuntimeError("interrupted")

    table = {
        "tiny": Recipe("tiny", "a stand-in", "generic", build),
        "broken": Recipe("broken", "fails half-way", "generic", broken),
        "needy": Recipe(
            "needy",
            "needs a module",
            "generic",
            build,
            requires=("no_such_module_xyz",),
            install="pip install xyz",
        ),
    }
    monkeypatch.setattr(models, "recipes", lambda: table)
    return table, built


def test_fetch_builds_once_and_again_for_a_new_recipe_version(fake_recipes, tmp_path, monkeypatch):
    table, built = fake_recipes
    first = models.fetch("tiny", tmp_path)
    assert first.model.read_bytes() == b"stand-in" and first.is_built_by(table["tiny"])
    models.fetch("tiny", tmp_path)
    assert len(built) == 1
    models.fetch("tiny", tmp_path, rebuild=True)
    assert len(built) == 2
    table["tiny"] = Recipe("tiny", "changed", "generic", table["tiny"].build, version=2)
    models.fetch("tiny", tmp_path)
    assert len(built) == 3


def test_a_failed_build_leaves_nothing_behind(fake_recipes, tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        models.fetch("broken", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_and_unknown_names_are_explained(fake_recipes, tmp_path):
    with pytest.raises(ZooError, match=r"needs no_such_module_xyz.*pip install xyz"):
        models.fetch("needy", tmp_path)
    with pytest.raises(ZooError, match=r"unknown zoo model 'gpt'.*tiny, broken, needy"):
        models.fetch("gpt", tmp_path)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("QGRAPH_CACHE", str(tmp_path / "explicit"))
    assert models.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QGRAPH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "qgraph"


def test_every_recipe_names_a_known_metric():
    from qgraph.evaluation import METRICS

    for recipe in models.recipes().values():
        assert recipe.metric in METRICS, recipe.name
