"""Writing outputs: under a temporary name, then renamed into place, so a reader never sees a torn file and a failed
write keeps the previous one; and the errors of a full, read-only or unwritable disk as one line. Light: no torch.

A rename within one folder is atomic on POSIX file systems; a folder (the HF export) is swapped in two renames, so a
kill between them leaves the old folder under a hidden name beside the new place, never a half-written one in it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.config import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError report the same failures (safetensors' SafetensorError carries Rust's
# io::Error text; torch's zip writer reports a short write, which a full disk causes, as "unexpected pos").
_NO_SPACE_TEXT = re.compile(r"No space left|os error 28|StorageFull|Disk quota|unexpected pos \d+ vs \d+")
_READ_ONLY_TEXT = re.compile(r"Read-only file system|os error 30|ReadOnlyFilesystem")
_DENIED_TEXT = re.compile(r"Permission denied|os error 13|PermissionDenied")


def temporary(path: Path) -> Path:
    """The hidden sibling a new `path` is written to first (`.best.tmp-PID.onnx`: the suffix kept for writers that
    choose the format by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`, else it is removed."""
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path` to build in; when the block succeeds it takes the place of `path` (an
    old folder there is removed), else it is removed and `path` is untouched."""
    path = Path(path)
    tmp = temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def scratch_dir(beside: str | Path) -> Iterator[Path]:
    """Yield a new empty hidden folder beside `beside` (the same file system: its files rename into place), removed
    when the block ends, however it ends."""
    tmp = temporary(Path(beside).with_suffix(".build"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error_line(error: BaseException, path: str | Path | None = None) -> str | None:
    """One line for a write that failed on a full, read-only or unwritable disk (OSError or a library's error
    saying so); None for any other error. `path`: where we were writing, when the error does not say."""
    where = getattr(error, "filename", None) or path or "the output folder"
    code = error.errno if isinstance(error, OSError) else None
    text = str(error)
    if code in _NO_SPACE or (code is None and _NO_SPACE_TEXT.search(text)):
        return f"no space left on {where}; free some space there and run the command again"
    if code == errno.EROFS or (code is None and _READ_ONLY_TEXT.search(text)):
        return f"cannot write {where}: read-only file system; write to another folder (--project or --output)"
    if code in (errno.EACCES, errno.EPERM) or (code is None and _DENIED_TEXT.search(text)):
        return f"cannot write {where}: permission denied; fix its permissions or write to another folder"
    return None


@contextmanager
def disk_errors(path: str | Path, hint: str = "") -> Iterator[None]:
    """Turn a disk error raised in the block into a UserError of one line naming `path` (and `hint`: what is kept,
    how to go on); any other error passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # OSError, safetensors' SafetensorError, torch's RuntimeError: sorted by write_error_line
        line = write_error_line(e, path)
        if line is None:
            raise
        raise UserError(f"{line}{'; ' + hint if hint else ''}") from e


def append_text(path: str | Path, text: str) -> None:
    """Append `text` to the file `path` as a whole new file renamed into place: a full disk keeps every earlier line
    intact instead of leaving a torn last one (the files appended to, results.csv, stay small)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        shutil.copyfile(path, tmp)
        with open(tmp, "a", newline="") as f:
            f.write(text)
