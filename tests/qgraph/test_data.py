"""qgraph.data: datasets round-trip, read one batch at a time, and fail with the path named."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest

from qgraph.data import (
    MAX_BATCH_ELEMENTS,
    ArraySpec,
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


def _lying_npz(path, shape: tuple[int, ...], payload: bytes = b"\0" * 64) -> None:
    """An .npz whose array 'x' declares ``shape`` in its header but holds ``payload``."""
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        member.write(payload)


def test_a_header_declaring_a_trillion_floats_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npz"
    _lying_npz(path, (10**12,))
    with pytest.raises(DatasetError) as error:
        next(read_batches(path))
    message = str(error.value)
    assert "huge.npz" in message and "array 'x'" in message and str(MAX_BATCH_ELEMENTS) in message


def test_arrays_are_checked_against_the_model_inputs_from_their_headers(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros(4_000_000, np.float32))  # 16 MB from a 16 KB file
    assert path.stat().st_size < 100_000
    inputs = {"x": ArraySpec(np.dtype(np.float32), (None, 4))}
    tracemalloc.start()
    with pytest.raises(DatasetError) as error:
        next(read_batches(path, inputs))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, "nothing was decompressed"
    assert "bomb.npz: array 'x' for input 'x' has shape [4000000], expected ['?', 4]" in str(
        error.value
    )
    np.savez(path, x=np.zeros((3, 4)))
    with pytest.raises(DatasetError, match="has dtype float64, expected float32"):
        next(read_batches(path, inputs))
    np.savez(path, x=np.zeros((3, 4), np.float32))
    assert next(read_batches(path, inputs))["x"].shape == (3, 4), "a dynamic dim takes any size"


def test_a_member_that_is_not_an_array_is_named(tmp_path):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"not an array")
    with pytest.raises(DatasetError, match=r"odd\.npz: not a readable \.npz file"):
        next(read_batches(path))
