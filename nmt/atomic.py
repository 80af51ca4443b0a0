"""Writes that never leave a half-written file or directory where a complete one is expected."""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def file_mode() -> int:
    """The mode a new file gets from the process's umask, as open() gives it (0644 under 022).
    Read from /proc where Linux has it: setting the umask to read it would change it, for a
    moment, for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the directory entries) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` in place of `target`.

    The old `target` is moved aside first and removed only after the new one is in place, so
    a crash in between leaves `.NAME.old-*` beside it, never a partial `target`.
    """
    fsync_tree(new)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(target: Path, overwrite: bool, marker: str, kind: str, error: type[Exception] = OSError,
                      holds_folders: bool = False, recognise: Callable[[Path], bool] | None = None) -> None:
    """Refuse a `target` for `replace_dir` unless it is new, empty, or with `overwrite` an earlier
    `kind` (one holding `marker`, which `recognise(marker_path)` reads as its own where a file of
    that name may be another program's): a folder of the user's is never replaced, nor is a
    folder put inside an earlier `kind` that holds none of its own (a model written into a data dir)."""
    if target.exists() and not target.is_dir():
        raise error(f"{target} is a file")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise error(f"{target} already exists and is not empty; pass --overwrite to replace it")
    if not (target / marker).is_file():
        raise error(f"{target} is not {kind} (no {marker}); --overwrite replaces only {kind}")
    if recognise is not None and not recognise(target / marker):
        raise error(f"{target} is not {kind} (its {marker} is not one nmt wrote); --overwrite replaces only {kind}")
    added = [p.name for p in target.iterdir() if p.is_dir() and not p.name.startswith(".")] if not holds_folders else []
    if added:
        raise error(f"{target} holds the folder {sorted(added)[0]}, which {kind} does not: --overwrite would delete it; "
                    "move it out first")


def write_text_atomic(path: Path, text: str) -> None:
    with open_text_atomic(path) as f:
        f.write(text)


def complete_dir(target: Path) -> Path | None:
    """`target`, or while `replace_dir` is between its two renames (or was killed there), the
    complete previous version moved aside beside it; None when neither exists. Only reads."""
    if target.is_dir():
        return target
    aside = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        with contextlib.suppress(FileNotFoundError):  # the writer may remove it meanwhile
            aside.append((path.stat().st_mtime, path))
    return max(aside)[1] if aside else None


def recover_dir(target: Path) -> None:
    """Undo what a killed `replace_dir` left behind: put the moved-aside version back when
    `target` is missing, and remove leftover temporary and old copies. For the writer only."""
    found = complete_dir(target)
    if found is not None and found != target:
        os.replace(found, target)
        fsync_dir(target.parent)
    for pattern in (f".{glob.escape(target.name)}.old-*", f".{glob.escape(target.name)}.tmp-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def written_in_place(path: Path) -> bool:
    """A device, pipe or socket (/dev/null, a FIFO) or a standard stream (/dev/stdout, whatever
    it is redirected to) is written to as it is: a file renamed onto it would put a plain file in
    its place, or leave the stream empty."""
    absolute = Path(os.path.abspath(path))
    stream = str(absolute) in ("/dev/stdout", "/dev/stderr") or absolute.parts[:3] == ("/", "dev", "fd") \
        or absolute.parts[:2] == ("/", "proc")
    return stream or (path.exists() and not path.is_file())


@contextlib.contextmanager
def open_text_atomic(path: Path):
    """A text file to write bit by bit that appears at `path` complete, or not at all: written
    beside it under a temporary name and renamed when the block ends without an error. Through
    a link, the file it names is written; a device or pipe is written to directly."""
    path = Path(path)
    if written_in_place(path):  # appended to: `>> log` redirects keep what the file held
        with open(path, "a", encoding="utf-8", newline="\n") as f:
            yield f
        return
    gzip_name = path.name if is_gzip_name(path) else None  # the name as given, as inputs are read
    with written_atomic(path) as tmp, open(tmp, "wb") as raw, _text_writer(raw, gzip_name) as f:
        yield f


@contextlib.contextmanager
def written_atomic(path: Path):
    """A temporary path beside `path` for a writer that takes a file name (matplotlib's, say): the
    file it writes there is renamed onto `path` when the block ends without an error, and removed
    otherwise, so that `path` holds the earlier file or the complete new one."""
    path = Path(os.path.realpath(path))
    tmp = temporary_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        with contextlib.suppress(FileNotFoundError):  # a file written again keeps its permissions (0600 stays private)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


NAME_MAX = 255  # bytes in one file name, on the file systems Linux uses


def temporary_beside(path: Path) -> Path:
    """A hidden temporary name beside `path` (.NAME.tmp-PID) for a file or folder to be renamed
    onto it, NAME cut short where the whole would pass the longest name the file system takes.
    What a killed process left under such names (its PID no longer running, or this one's) is
    removed first."""
    suffix = f".tmp-{os.getpid()}"
    name = os.fsencode(path.name)[: NAME_MAX - 1 - len(suffix)].decode("utf-8", "ignore")  # a character cut in two is left out
    for left in path.parent.glob(f".{glob.escape(name)}.tmp-*"):
        pid = left.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not process_running(int(pid))):
            with contextlib.suppress(OSError):
                remove_entry(left)
    return path.parent / f".{name}{suffix}"


def remove_entry(path: Path) -> None:
    """Remove a file, a link or a folder with what it holds (nothing where nothing is)."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether a process of this PID runs (a writer that may still be using its temporary files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def _text_writer(raw, gzip_name: str | None):
    """UTF-8 text into the binary file `raw`, gzip-compressed when it is to be named `gzip_name`
    (a name ending in .gz, as every input of that name is read); `raw` stays open, to be synced."""
    # The name goes into the gzip header, where the temporary file's would go otherwise.
    stream = gzip.GzipFile(gzip_name, mode="wb", fileobj=raw) if gzip_name else raw
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
    try:
        yield text
    finally:
        text.detach()  # flushed, and `raw` not closed with it
        if gzip_name:
            stream.close()  # its trailer; the file it writes into is left open


def is_gzip_name(path: Path) -> bool:
    """Files named .gz are read and written gzip-compressed."""
    return Path(path).suffix == ".gz"
