"""Datasets of model inputs: what calibration and evaluation read.

A dataset is a folder of ``.npz`` files, each one batch: a feed dict whose keys are the model's
input names. An optional ``dataset.json`` beside them says how to judge outputs (``metric``)
and what the data is (``description``). A single ``.npz`` file is a one-batch dataset, and
any Python iterable of feed dicts is a dataset too.

Batches are read one at a time, so nothing here holds more than one batch in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from qgraph.atomic import replaced_folder
from qgraph.errors import QGraphError, link_problem, not_a_regular_file

INFO_FILE = "dataset.json"

Feeds = dict[str, np.ndarray]
DataSource = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]


class DatasetError(QGraphError):
    """A dataset is missing, empty or malformed."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a dataset folder."""

    metric: str | None = None
    description: str = ""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def batch_files(source: str | os.PathLike) -> list[Path]:
    """The ``.npz`` files of a dataset folder (sorted by name), or ``[source]`` for one file."""
    path = Path(source)
    if problem := not_a_regular_file(path):
        raise DatasetError(problem)
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetError(f"{path}: a dataset is a .npz file or a folder of them")
        return [path]
    if not path.is_dir():
        missing = link_problem(path) or "no such dataset (a .npz file or a folder of them)"
        raise DatasetError(f"{path}: {missing}")
    files = sorted(path.glob("*.npz"))
    for file in files:
        if problem := not_a_regular_file(file):
            raise DatasetError(problem)
    if not files:
        raise DatasetError(f"{path}: the folder holds no .npz files")
    return files


def read_batches(source: DataSource) -> Iterator[Feeds]:
    """The batches of ``source`` (a dataset path, or an iterable of feed dicts), one at a time."""
    if isinstance(source, (str, os.PathLike)):
        for file in batch_files(source):
            yield _read_npz(file)
    else:
        for feeds in source:
            yield {name: np.asarray(array) for name, array in feeds.items()}


def _read_npz(file: Path) -> Feeds:
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise DatasetError(f"{file}: not a readable .npz file ({error})") from error


def read_info(source: DataSource) -> DatasetInfo:
    """The ``dataset.json`` of a dataset folder; defaults where there is none."""
    if not isinstance(source, (str, os.PathLike)):
        return DatasetInfo()
    path = Path(source)
    info_file = (path if path.is_dir() else path.parent) / INFO_FILE
    if not info_file.is_file():
        return DatasetInfo()
    try:
        return DatasetInfo(**json.loads(info_file.read_text()))
    except (ValueError, TypeError) as error:
        raise DatasetError(f"{info_file}: malformed ({error})") from error


def write_dataset(
    folder: Path, batches: Iterable[Mapping[str, np.ndarray]], info: DatasetInfo
) -> int:
    """Write ``batches`` as a dataset folder (replacing it whole, atomically); return the count."""
    count = 0
    with replaced_folder(Path(folder)) as staging:
        for count, feeds in enumerate(batches, start=1):
            np.savez(staging / f"{count - 1:06d}.npz", **feeds)
        (staging / INFO_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    return count
