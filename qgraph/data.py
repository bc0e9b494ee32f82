"""Datasets of model inputs: what calibration and evaluation read.

A dataset is a folder of ``.npz`` files, each one batch: a feed dict whose keys are the model's
input names. An optional ``dataset.json`` beside them says how to judge outputs (``metric``)
and what the data is (``description``). A single ``.npz`` file is a one-batch dataset, and
any Python iterable of feed dicts is a dataset too.

Batches are read one at a time, so nothing here holds more than one batch in memory. Before a
batch file's data is read, the ``.npy`` header of each of its arrays is (``numpy.lib.format``:
magic, then the header dict: shape, dtype, order) and checked, so that a small file declaring a
huge array (a 777 KB file inflating to 800 MB, a header claiming 10^12 floats) is refused by
name without allocating anything:

- every batch holds at most ``MAX_BATCH_ELEMENTS`` elements in all its arrays (``prod(shape)``
  summed), whatever the model: 2^28, 1 GiB of float32, far above any real calibration batch;
- when the model's inputs are known (``ArraySpec``), an array for an input must have its dtype,
  its rank, and its size on every fixed dimension (a dynamic one may take any size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.atomic import replaced_folder
from qgraph.errors import QGraphError, link_problem, not_a_regular_file

INFO_FILE = "dataset.json"
MAX_BATCH_ELEMENTS = 2**28
"""Elements one batch file may hold in all its arrays, checked from their headers."""
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
"""The ``.npy`` header versions numpy writes for plain arrays (3.0 is for structured dtypes
with non-Latin-1 field names, which no model input has)."""

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


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What a model input accepts: a dtype, and a shape whose None entries are dynamic."""

    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None

    @classmethod
    def of(cls, value: ir.Value) -> ArraySpec:
        dtype = None if value.dtype is None else np.dtype(value.dtype.numpy())
        shape = value.shape
        dims = None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)
        return cls(dtype, dims)

    def problem(self, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        """Why an array of ``shape`` and ``dtype`` does not fit, or None."""
        if self.dtype is not None and dtype != self.dtype:
            return f"dtype {dtype}, expected {self.dtype}"
        if self.shape is None:
            return None
        fits = len(shape) == len(self.shape) and all(
            want is None or want == size for want, size in zip(self.shape, shape, strict=True)
        )
        expected = [d if d is not None else "?" for d in self.shape]
        return None if fits else f"shape {list(shape)}, expected {expected}"


def input_specs(graph: ir.Graph) -> dict[str, ArraySpec]:
    """The ``ArraySpec`` of each input of ``graph``, by name."""
    return {value.name: ArraySpec.of(value) for value in graph.inputs}


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


def read_batches(
    source: DataSource, inputs: Mapping[str, ArraySpec] | None = None
) -> Iterator[Feeds]:
    """The batches of ``source`` (a dataset path, or an iterable of feed dicts), one at a time;
    a file's arrays are checked from their headers first, against ``inputs`` if given."""
    if isinstance(source, (str, os.PathLike)):
        for file in batch_files(source):
            yield _read_npz(file, inputs or {})
    else:
        for feeds in source:
            yield {name: np.asarray(array) for name, array in feeds.items()}


def _read_npz(file: Path, inputs: Mapping[str, ArraySpec]) -> Feeds:
    try:
        _check_headers(file, inputs)
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{file}: not a readable .npz file ({error})") from error


def _check_headers(file: Path, inputs: Mapping[str, ArraySpec]) -> None:
    """Refuse ``file`` by its arrays' headers alone: over ``MAX_BATCH_ELEMENTS`` in all, or an
    array that does not fit its input's ``ArraySpec``."""
    total = 0
    for name, shape, dtype in _array_headers(file):
        spec = inputs.get(name)
        problem = spec.problem(shape, dtype) if spec is not None else None
        if problem is not None:
            raise DatasetError(f"{file}: array '{name}' for input '{name}' has {problem}")
        total += math.prod(shape)
        if total > MAX_BATCH_ELEMENTS:
            raise DatasetError(
                f"{file}: array '{name}' (shape {list(shape)}) takes the batch past "
                f"{MAX_BATCH_ELEMENTS} elements, the most qgraph reads in one batch; split it"
            )


def _array_headers(file: Path) -> Iterator[tuple[str, tuple[int, ...], np.dtype]]:
    """``(name, shape, dtype)`` of each array of an ``.npz`` file, from its ``.npy`` header."""
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version not in _HEADER_READERS:
                    raise ValueError(f"array '{name}' has .npy header version {version}")
                shape, _, dtype = _HEADER_READERS[version](stream)
            yield name, shape, dtype


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
