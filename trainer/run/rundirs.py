"""Run folders: `{project}/{name}`, numbered `exp2`, `exp3`, ... unless `exist_ok`, and one writer each. Light: no
torch, no data package (accelerate is imported only when several processes must agree on the folder).

A new folder is claimed with `mkdir` (atomic: two runs started at once never pick the same `expN`), and every run
folder is locked for the run's life with `flock` on `{run}/.trainer.lock`: the OS drops the lock when the process
ends, however it ends (kill -9 included), so a lock is never stale. A second writer is refused in one line naming
the holder's host and PID."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import UserError
from trainer.run.layout import WEIGHTS

if TYPE_CHECKING:
    from accelerate import Accelerator

LOCK_FILE = ".trainer.lock"  # holds "host PID" of the process that writes the folder; kept after the run
_held: dict[str, tuple[int, Path]] = {}  # run folder (resolved) -> (descriptor of its locked file, the folder)
_joined: list[Path] = []  # the run folders every rank of this process's command agreed on (create_run_dir)


@dataclass(frozen=True)
class RunFolder:
    """Where a command writes its outputs: `--project`, `--name`, `--exist-ok`."""

    project: str
    name: str = "exp"
    exist_ok: bool = False


def increment_path(path: Path, exist_ok: bool) -> Path:
    """`runs/train/exp` -> `runs/train/exp2`, `exp3`, ... (YOLOv5 style) unless `exist_ok`."""
    if exist_ok or not path.exists():
        return path
    pattern = re.compile(re.escape(path.name) + r"(\d+)$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{path.name}{max([1, *taken]) + 1}")


def _claim(path: Path, exist_ok: bool) -> Path:
    """Create the run folder; without `exist_ok` the next free `expN`, taken by mkdir so two runs never share one."""
    if exist_ok:
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        candidate = increment_path(path, exist_ok=False)
        try:
            candidate.mkdir()  # atomic: exactly one of two racing runs creates it
            return candidate
        except FileExistsError:
            continue  # another run took it between the listing and the mkdir: look again
    raise UserError(f"cannot pick a free run folder after {path}: 1000 tries lost to other runs; use another --name")


def lock_run_dir(run_dir: Path) -> None:
    """Hold `{run_dir}/.trainer.lock` for the life of this process (or until release_run_dir); UserError naming the
    holder when another process writes the folder. Re-locking a folder this process holds is a no-op."""
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    lock_path = Path(run_dir) / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"cannot lock run folder {run_dir} ({e.strerror}); choose a folder on a local disk") from e
        who = f"PID {holder[1]} on host {holder[0]}" if len(holder) >= 2 else "another process"
        raise UserError(
            f"run folder {run_dir} is in use by {who} (it holds {lock_path}); one run writes a folder at a time: "
            "wait for it to end or stop it, or choose another --name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
    _held[key] = (fd, Path(run_dir))


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock on `run_dir` (the file stays: removing it would race a process opening it)."""
    held = _held.pop(os.path.realpath(run_dir), None)
    if held is not None:
        os.close(held[0])  # closing the descriptor releases the flock


def release_run_dirs() -> None:
    """Drop every lock this process holds and forget its run folders (a command ending, in-process callers too)."""
    for key in list(_held):
        os.close(_held.pop(key)[0])
    _joined.clear()


def held_run_dir() -> Path | None:
    """The run folder this process writes (the latest it locked), to name it in an error that does not."""
    return next(reversed(_held.values()))[1] if _held else None


def joined_run_dir() -> Path | None:
    """The run folder of this command on any rank (the main process holds it; the others were told it), to name it
    in an error on a rank that does not hold it: a lost peer."""
    return next(reversed(_joined), None) or held_run_dir()


def make_run_dir(folder: RunFolder, weights_dir: bool = False, existing: Path | None = None) -> Path:
    """Pick and create the run folder (with `weights/` when asked) in this process, or take `existing` (a resumed
    run), and lock it; UserError if it cannot be made or another process writes it."""
    try:
        wanted = Path(folder.project) / folder.name
        run_dir = Path(existing) if existing is not None else _claim(wanted, folder.exist_ok)
        lock_run_dir(run_dir)
        if weights_dir:
            (run_dir / WEIGHTS).mkdir(exist_ok=True)
    except OSError as e:
        where = e.filename or folder.project
        raise UserError(f"cannot create run folder {where}: {e.strerror}; choose another --project") from e
    return run_dir


def create_run_dir(
    accelerator: Accelerator, folder: RunFolder, weights_dir: bool = True, existing: Path | None = None
) -> Path:
    """Every rank calls this; the main process picks and creates the folder (with `weights/` unless told not to), or
    takes `existing`, and locks it; the others receive its path, or its refusal."""
    chosen = [None]
    if accelerator.is_main_process:
        try:
            chosen = [str(make_run_dir(folder, weights_dir, existing))]
        except UserError as e:
            chosen = [f"error: {e}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        # Collective: every rank must take part, or the others wait forever. It carries the main process's decision
        # (the folder, or why it is refused, e.g. locked by another run) so every rank goes on or stops alike.
        chosen = broadcast_object_list(chosen, from_process=0)
    if chosen[0].startswith("error: "):
        raise UserError(chosen[0].removeprefix("error: "))
    _joined.append(Path(chosen[0]))
    return Path(chosen[0])
