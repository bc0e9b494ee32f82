"""qgraph.outputs: the one output policy, each refusal one line naming the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qgraph.atomic import replaced_file
from qgraph.errors import OutputError
from qgraph.outputs import check_output, check_output_folder, dataset_inputs


def _refusal(path: str | Path, inputs=None) -> str:
    with pytest.raises(OutputError) as error:
        check_output(path, inputs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_an_existing_file_is_replaced_and_a_new_one_made(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"old")
    assert check_output(tmp_path / "old.onnx") is True
    assert check_output(tmp_path / "new.onnx") is False
    assert sorted(os.listdir(tmp_path)) == ["old.onnx"], "the check leaves nothing behind"


def test_an_input_is_refused_under_any_name(tmp_path):
    data = tmp_path / "calib.npz"
    data.write_bytes(b"batch")
    (tmp_path / "alias.npz").symlink_to(data)
    (tmp_path / "hard.npz").hardlink_to(data)
    inputs = {data: "the calibration data"}
    for name in ("calib.npz", "./calib.npz", "alias.npz", "hard.npz"):
        message = _refusal(str(tmp_path / name), inputs)
        assert "is the calibration data" in message and "never overwrites its inputs" in message


def test_a_folder_is_refused_even_when_it_does_not_exist_yet(tmp_path):
    """``-o newdir/`` once wrote a file called ``newdir``."""
    assert "is a folder" in _refusal(f"{tmp_path}/newdir/")
    assert "is a folder" in _refusal(tmp_path)
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/proc/x.onnx", "cannot write in folder '/proc'"),
        ("/sys/x.onnx", "cannot write in folder '/sys'"),
        ("a\0b.onnx", "cannot hold a NUL byte"),
        ("a" * 300 + ".onnx", "File name too long"),
        ("/nowhere/x.onnx", "output folder '/nowhere' does not exist"),
    ],
)
def test_paths_no_file_system_takes_are_one_line(path, expected):
    """These ended in "internal error ... please report it" (FileNotFoundError,
    PermissionError, ValueError, OSError)."""
    message = _refusal(path)
    assert expected in message and len(message) < 300


def test_a_dataset_folder_replaces_only_a_dataset(tmp_path):
    dataset = tmp_path / "out.calibration"
    dataset.mkdir()
    (dataset / "000000.npz").write_bytes(b"batch")
    assert check_output_folder(dataset) is True
    (dataset / "holiday.jpg").write_bytes(b"photo")
    with pytest.raises(OutputError, match=r"holds 'holiday\.jpg'"):
        check_output_folder(dataset)
    with pytest.raises(OutputError, match="is the cached model"):
        check_output_folder(dataset, {dataset: "the cached model"})


def test_dataset_inputs_are_its_batches_its_info_and_its_folder(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"batch")
    assert set(dataset_inputs(tmp_path, "the data")) == {
        tmp_path,
        tmp_path / "a.npz",
        tmp_path / "dataset.json",
    }
    assert dataset_inputs([{"x": 1}], "the data") == {}


def test_a_failed_write_names_its_target(tmp_path):
    target = tmp_path / "out.toml"
    with pytest.raises(OutputError, match=r"out\.toml: cannot be written"), replaced_file(target):
        raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []
