"""Checks on the paths a command is given: which name one place, which hold each other, and
output files and folders that can be written without destroying what the command reads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nmt.atomic import written_in_place
from nmt.errors import DataError


def followed_link(path: Path) -> Path:
    """Where a link at `path` leads: an output folder given as a link is written through (the
    folder replaced), never replaced by a folder of its own."""
    return Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)


def same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file or folder: the same one where both exist (links, other
    spellings), else the same absolute path."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def nested(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one folder, or one holds the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_apart(output: Path, inputs: Sequence[Path | None], owned: Sequence[Path]) -> None:
    """Refuse an output file that is one of the `inputs`, or one of the files and folders in
    `owned` (a data dir, a model's own files) or inside one: writing it would destroy what the
    command reads."""
    for given in inputs:
        if given is not None and output.is_file() and Path(given).is_file() and os.path.samefile(output, given):
            raise DataError(f"cannot write {output}: it is the input {given}")
    if written_in_place(output):  # a stream or device is no file of a folder
        return
    written = Path(os.path.realpath(output))
    for path in owned:
        resolved = Path(path).resolve()
        if resolved == written:
            raise DataError(f"cannot write {output}: it is {path}, which this command reads")
        if resolved in written.parents:
            raise DataError(f"cannot write {output}: it is inside {path}, which this command reads")


def make_folder(path: Path, option: str) -> None:
    """The folder an option names, made if missing; a one-line error where it cannot be."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {option} {path}: {e.strerror or e}") from None


def check_output_file(path: Path) -> None:
    """Refuse, before the work, an output file that cannot be written: a folder, or one in a
    folder that cannot be made."""
    if path.is_dir():
        raise DataError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
