"""``qgraph models``: the model zoo's list and its fetch."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from qgraph import models
from qgraph.atomic import replaced_file, replaced_folder
from qgraph.cli.common import OUTPUT, echo_json, err, note_replaced, out
from qgraph.outputs import Inputs, check_output, check_output_folder


@click.group(name="models")
def models_group() -> None:
    """The model zoo: reference and real models with their data, built into a local cache."""


@models_group.command(name="list")
def models_list() -> None:
    """List the zoo's models, their metric, and whether they are built."""
    cache = models.cache_dir()
    for recipe in models.recipes().values():
        zoo_model = models.ZooModel(recipe.name, cache / recipe.name, recipe.metric)
        built = "built" if zoo_model.is_built_by(recipe) else "-"
        out.print(f"{recipe.name:22} {recipe.metric:10} {built:6} {recipe.summary}")


@models_group.command(name="fetch")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    type=OUTPUT,
    metavar="PATH",
    help="Also copy the model here, and its data beside it (OUT.calibration/, OUT.evaluation/). "
    "Existing copies are replaced (with a note); a folder there that is not a dataset, the "
    "cache's own files, a symlink or a device is refused.",
)
@click.option("--rebuild", is_flag=True, help="Build again even if it is in the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON.")
def models_fetch(name: str, output: str | None, rebuild: bool, as_json: bool) -> None:
    """Build zoo model NAME into the cache (once) and print where its parts are."""
    with err.status(f"building {name}"):
        zoo_model = models.fetch(name, rebuild=rebuild)
    paths = {
        "model": zoo_model.model,
        "calibration": zoo_model.calibration,
        "evaluation": zoo_model.evaluation,
    }
    if output is not None:
        cached = {
            file: f"the cached {name}" for file in [zoo_model.folder, *zoo_model.folder.rglob("*")]
        }
        paths = _copy_zoo_model(paths, output, cached)
    if as_json:
        echo_json({k: str(v) for k, v in paths.items()} | {"metric": zoo_model.metric})
    else:
        for key, path in paths.items():
            click.echo(f"{key:12} {path}")


def _copy_zoo_model(paths: dict[str, Path], output: str, cached: Inputs) -> dict[str, Path]:
    """The model copied to ``output``, its datasets to ``output`` with their key as suffix
    (every destination checked before anything is written)."""
    replaced = {output: check_output(output, cached)}
    copies = {"model": Path(output)}
    for key in ("calibration", "evaluation"):
        copies[key] = copies["model"].with_suffix(f".{key}")
        replaced[str(copies[key])] = check_output_folder(copies[key], cached)
    for key in ("calibration", "evaluation"):
        with replaced_folder(copies[key]) as staging:
            shutil.copytree(paths[key], staging, dirs_exist_ok=True)
    with replaced_file(copies["model"]) as staging:
        shutil.copyfile(paths["model"], staging)
    for path, was_there in replaced.items():
        note_replaced(path, was_there)
    return copies
