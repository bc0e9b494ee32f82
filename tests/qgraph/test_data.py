"""qgraph.data: datasets round-trip, read one batch at a time, and fail with the path named."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.data import (
    DatasetError,
    DatasetInfo,
    batch_files,
    read_batches,
    read_info,
    write_dataset,
)


def _batches(count: int):
    rng = np.random.default_rng(0)
    return [
        {"x": rng.normal(size=(2, 3)).astype(np.float32), "ids": np.arange(4) + i}
        for i in range(count)
    ]


def test_folder_round_trip_keeps_order_dtypes_and_info(tmp_path):
    batches = _batches(12)
    assert write_dataset(tmp_path / "d", batches, DatasetInfo("top1", "twelve")) == 12
    read = list(read_batches(tmp_path / "d"))
    assert len(read) == 12
    for original, copy in zip(batches, read, strict=True):
        assert original.keys() == copy.keys()
        for name in original:
            assert copy[name].dtype == original[name].dtype
            np.testing.assert_array_equal(copy[name], original[name])
    assert read_info(tmp_path / "d") == DatasetInfo("top1", "twelve")


def test_a_single_file_and_an_iterable_are_datasets(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.ones(3))
    assert [list(b) for b in read_batches(tmp_path / "one.npz")] == [["x"]]
    assert read_info(tmp_path / "one.npz") == DatasetInfo()
    assert len(list(read_batches(iter(_batches(3))))) == 3


def test_rewriting_replaces_the_whole_folder_with_a_normal_mode(tmp_path):
    write_dataset(tmp_path / "d", _batches(5), DatasetInfo())
    write_dataset(tmp_path / "d", _batches(2), DatasetInfo())
    assert len(batch_files(tmp_path / "d")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "d").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_bad_datasets_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset"):
        batch_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"holds no \.npz files"):
        batch_files(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"a \.npz file or a folder"):
        batch_files(tmp_path / "notes.txt")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"broken\.npz: not a readable \.npz"):
        list(read_batches(tmp_path / "broken.npz"))
