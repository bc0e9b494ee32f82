"""Zoo recipe ``magika``: Google's Magika file-type classifier, on real files from this machine.

The model is the ONNX file inside the pinned ``magika`` wheel (``standard_v3_3``): input
``bytes`` int32 [batch, 2048], output ``target_label`` float32 [batch, 214], the probability of
each content type. Its input is built as magika's own config (``config.min.json``) says:

- read at most ``block_size`` (4096) bytes from the start and from the end of the file;
- ``beg``: the start, left-stripped of ASCII whitespace, first ``beg_size`` (1024) bytes,
  padded at the end with ``padding_token`` (256);
- ``end``: the end, right-stripped, last ``end_size`` (1024) bytes, padded at the start;
- the input row is ``beg + end`` (``mid_size`` is 0). Files under ``min_file_size_for_dl``
  bytes never reach the model in magika, so they are left out here too.

Files come from Python's standard library (site-packages excluded), ``/usr/share`` and
``/usr/lib``: up to ``PER_TYPE`` files per file-name extension, chosen by a stable hash of the
path, so that many content types are represented, not only the commonest. A second hash splits
them into calibration and evaluation. The set depends on what is installed on the machine; on
one machine it is reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qgraph.data import DatasetInfo, write_dataset
from qgraph.models import Recipe, cache_dir
from qgraph.models.pypi import WheelFile, extract

WHEEL = ("magika", "1.0.3")
MODEL = WheelFile(
    *WHEEL,
    "magika/models/standard_v3_3/model.onnx",
    "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
)
CONFIG = WheelFile(
    *WHEEL,
    "magika/models/standard_v3_3/config.min.json",
    "ae24c742205358f6ff6dfd5facb6743fb69743dbba8373e73da58ff0cbd695db",
)
INPUT_NAME = "bytes"
PER_TYPE = 24
"""Files per extension at most (split about 1:3 between calibration and evaluation)."""
BATCH = 64
CALIBRATION_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """The feature-extraction fields of magika's ``config.min.json``."""

    beg_size: int
    mid_size: int
    end_size: int
    padding_token: int
    block_size: int
    min_file_size_for_dl: int

    @classmethod
    def from_file(cls, path: Path) -> FeatureConfig:
        config = json.loads(path.read_text())
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})


def features(data_start: bytes, data_end: bytes, config: FeatureConfig) -> np.ndarray:
    """One model input row from the first and last ``block_size`` bytes of a file."""
    beg = list(data_start.lstrip()[: config.beg_size])
    beg += [config.padding_token] * (config.beg_size - len(beg))
    stripped_end = data_end.rstrip()
    end = list(stripped_end[max(0, len(stripped_end) - config.end_size) :])
    end = [config.padding_token] * (config.end_size - len(end)) + end
    return np.array(beg + end, dtype=np.int32)


def file_features(path: Path, config: FeatureConfig) -> np.ndarray:
    size = path.stat().st_size
    count = min(config.block_size, size)
    with path.open("rb") as file:
        start = file.read(count)
        file.seek(size - count)
        end = file.read(count)
    return features(start, end, config)


def default_roots() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share"), Path("/usr/lib")]


def _stable_fraction(path: Path, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def candidate_files(roots: list[Path], min_size: int) -> Iterator[Path]:
    """Regular, readable files of at least ``min_size`` bytes, never through a link."""
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d != "site-packages")
            for name in sorted(names):
                path = Path(folder) / name
                try:
                    if not path.is_symlink() and path.is_file() and path.stat().st_size >= min_size:
                        yield path
                except OSError:
                    continue


def sample_files(roots: list[Path], min_size: int) -> tuple[list[Path], list[Path]]:
    """(calibration, evaluation): up to ``PER_TYPE`` files per extension, split by hash."""
    by_type: dict[str, list[Path]] = defaultdict(list)
    for path in candidate_files(roots, min_size):
        by_type[path.suffix.lower()].append(path)
    calibration, evaluation = [], []
    for suffix in sorted(by_type):
        chosen = sorted(by_type[suffix], key=lambda p: _stable_fraction(p, "pick"))[:PER_TYPE]
        for path in sorted(chosen):
            side = (
                calibration if _stable_fraction(path, "split") < CALIBRATION_SHARE else evaluation
            )
            side.append(path)
    return calibration, evaluation


def batches(paths: list[Path], config: FeatureConfig) -> Iterator[dict[str, np.ndarray]]:
    """Whole batches of ``BATCH`` rows (a final partial batch is dropped)."""
    rows = [file_features(path, config) for path in paths]
    for start in range(0, len(rows) - BATCH + 1, BATCH):
        yield {INPUT_NAME: np.stack(rows[start : start + BATCH])}


def build(folder: Path) -> None:
    cache = cache_dir()
    config = FeatureConfig.from_file(extract(CONFIG, cache))
    (folder / "model.onnx").write_bytes(extract(MODEL, cache).read_bytes())
    calibration, evaluation = sample_files(default_roots(), config.min_file_size_for_dl)
    description = "files from the stdlib, /usr/share and /usr/lib, {} of them, by extension"
    write_dataset(
        folder / "calibration",
        batches(calibration, config),
        DatasetInfo("top1", description.format(len(calibration))),
    )
    write_dataset(
        folder / "evaluation",
        batches(evaluation, config),
        DatasetInfo("top1", description.format(len(evaluation)) + ", held out"),
    )


RECIPES = (
    Recipe(
        "magika",
        "Magika file-type classifier (ONNX from the magika wheel) on real files of this machine",
        "top1",
        build,
    ),
)
