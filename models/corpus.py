"""Real English text found on this machine: docstrings of Python's standard library.

Every machine that runs qgraph has them (``sysconfig``'s ``stdlib`` folder), they are written
by people for people, and they are stable for a given Python version, so datasets built from
them are reproducible. Prose paragraphs are kept (at least ``MIN_WORDS`` words, mostly
letters, ending in a full stop); code examples, tables and signatures are dropped.

Files are split into calibration and evaluation by a stable hash of their path, so no
paragraph (and no file's vocabulary) appears on both sides: evaluation text is held out.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_WORDS = 12
MIN_LETTER_SHARE = 0.75
SKIPPED_FOLDERS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
)
EVALUATION_SHARE = 0.5
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, tests excluded, sorted by relative path."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if not SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` belongs to the evaluation side (a stable hash of its relative path)."""
    relative = path.relative_to(root or stdlib_root()).as_posix()
    bucket = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "big") / 2**32
    return bucket < EVALUATION_SHARE


def docstrings(path: Path) -> Iterator[str]:
    """The module, class and function docstrings of one source file, cleaned of indentation."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield inspect.cleandoc(text)


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < MIN_WORDS or not paragraph.endswith("."):
        return False
    if ">>>" in paragraph or "::" in paragraph:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) >= MIN_LETTER_SHARE


def paragraphs(held_out: bool, root: Path | None = None) -> Iterator[str]:
    """Prose paragraphs (joined to one line) from one side of the split, in file order."""
    root = root or stdlib_root()
    for path in source_files(root):
        if is_held_out(path, root) != held_out:
            continue
        for text in docstrings(path):
            for block in re.split(r"\n\s*\n", text):
                paragraph = " ".join(block.split())
                if is_prose(paragraph):
                    yield paragraph


def sentences(paragraph: str) -> list[str]:
    """``paragraph`` cut at sentence ends (a full stop then a capital letter)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]
