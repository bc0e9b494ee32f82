"""Where qgraph writes: the one output policy of every command.

Every file a command writes (``compile``'s model and its external data, ``inspect --draw``'s
drawing, ``debug``'s recipe, ``models fetch -o``'s copy and its dataset folders) is checked
by ``check_output`` (``check_output_folder`` for a dataset folder) before it is written:

- It is none of the command's inputs: the model and every external-data file it was loaded
  with (even once its weights are quantized in memory), the calibration or evaluation data,
  the recipe. Paths are compared as files (symlinks resolved, same device and inode), so
  another name for an input is refused too.
- It is a file name: a path ending in a separator or naming a folder is refused (``-o
  newdir/`` once wrote a file called ``newdir``), and so is a symlink, FIFO, device or
  socket, which replacing would not write where it points.
- An existing regular file there is replaced, and the command says so on stderr; a dataset
  folder replaces only a folder holding a dataset (``.npz`` files and ``dataset.json``).
- A name no file system takes (a NUL byte, a component too long), a missing folder and a
  folder that refuses new files are one line naming the path, before any work is done.

The writing itself goes through a staging file renamed into place (``qgraph.atomic``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from qgraph.data import INFO_FILE
from qgraph.errors import OutputError, not_a_regular_file

Inputs = Mapping[Path, str]
"""The files a command reads, each with what it is ("the calibration data")."""

SHOWN_NAME_CHARACTERS = 100
"""Longer paths are clipped in error messages (a 5000-character name is not worth a screen)."""

_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)


def dataset_inputs(source: object, what: str) -> dict[Path, str]:
    """The files of a dataset path as inputs: its batches, its ``dataset.json`` and the folder
    itself (none for an in-memory dataset)."""
    if not isinstance(source, (str, os.PathLike)):
        return {}
    path = Path(source)
    files = [path, (path if path.is_dir() else path.parent) / INFO_FILE]
    if path.is_dir():
        files.extend(path.glob("*.npz"))
    return {file: what for file in files}


def check_output(
    path: str | os.PathLike,
    inputs: Inputs | None = None,
    *,
    error: type[OutputError] = OutputError,
) -> bool:
    """Refuse ``path`` as an output file (``error``, one line naming it), or return whether a
    file is there, which writing will replace."""
    try:
        text = os.fspath(path)
        target = _checked_name(text)
        if text.endswith(_SEPARATORS) or target.is_dir():
            raise OutputError(f"{shown(text)}: is a folder; give a file name for the output")
        _check_place(target, inputs or {})
    except OutputError as refusal:
        raise error(str(refusal)) from refusal.__cause__
    return target.exists()


def check_output_folder(path: str | os.PathLike, inputs: Inputs | None = None) -> bool:
    """Refuse ``path`` as a dataset folder to write, or return whether one is there, which
    writing will replace."""
    target = _checked_name(os.fspath(path))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file; qgraph writes a dataset folder there")
    _check_place(target, inputs or {})
    if target.is_dir():
        _check_dataset_folder(target)
    return target.exists()


def shown(text: str) -> str:
    """``text`` clipped for an error message when it is very long."""
    if len(text) <= SHOWN_NAME_CHARACTERS:
        return text
    return f"{text[:SHOWN_NAME_CHARACTERS]}... ({len(text)} characters)"


def _checked_name(text: str) -> Path:
    """``text`` as a path, refused when no file system would take it."""
    if "\0" in text:
        raise OutputError(f"{shown(text)}: a file name cannot hold a NUL byte")
    try:
        os.lstat(text)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as error:
        raise OutputError(f"{shown(text)}: cannot be an output ({error.strerror})") from error
    return Path(text)


def _check_place(target: Path, inputs: Inputs) -> None:
    folder = target.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"{target}: output folder '{folder}' {problem}")
    for file, what in inputs.items():
        if same_file(target, file):
            raise OutputError(
                f"{target}: is {what} ('{file}'); qgraph never overwrites its inputs, choose "
                "another output path"
            )
    if target.is_symlink() or not_a_regular_file(target):
        raise OutputError(
            f"{target}: is a symlink, FIFO, device or socket; qgraph writes only regular files "
            "(replacing it would not write where it points)"
        )
    _check_writable(target)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (symlinks resolved; a missing path names none)."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _check_writable(target: Path) -> None:
    """Refuse ``target`` when its folder takes no new file (``/proc``, ``/sys``, read-only)."""
    try:
        descriptor, name = tempfile.mkstemp(prefix=".qgraph-", dir=target.parent)
    except OSError as error:
        raise OutputError(
            f"{target}: cannot write in folder '{target.parent}' ({error.strerror or error})"
        ) from error
    os.close(descriptor)
    os.unlink(name)


def _check_dataset_folder(folder: Path) -> None:
    for item in folder.iterdir():
        if item.name != INFO_FILE and not (item.is_file() and item.suffix == ".npz"):
            raise OutputError(
                f"{folder}: holds '{item.name}', so it is not a dataset folder qgraph may "
                "replace; move it away or choose another output name"
            )
