"""Environment errors -> one line for the user: what failed, where, what to do (cli.main prints it, exit 2).

The errors of a full, read-only or unwritable disk (trainer.run.writes), a damaged safetensors file, and the messages of
libraries that name the cause in their own words (torch's "unexpected pos" of a short write). Light: no torch."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

from trainer.run.layout import checkpoint_dirs
from trainer.run.peers import lost_peer, lost_peer_line
from trainer.run.rundirs import held_run_dir, joined_run_dir
from trainer.run.writes import write_error_line

# torch's zip writer on a short write (a full disk): "[enforce fail at inline_container.cc:672] . unexpected pos 64
# vs 0" -> what happened.
_TORCH_SHORT_WRITE = re.compile(r"\[enforce fail at inline_container\.cc:\d+\][ .]*unexpected pos \d+ vs \d+")


def plain(message: str) -> str:
    """A one-line message with library wording that means a full disk replaced by saying so."""
    return _TORCH_SHORT_WRITE.sub("no space left on device", message)


def error_line(error: BaseException, resume_dir: Path | None = None) -> str | None:
    """One line for an environment error the commands do not catch themselves, or None (then it is a bug: the
    traceback is shown). `resume_dir`: the run `train --resume` continues, to name its newest checkpoint."""
    line = write_error_line(error, held_run_dir())
    if line is not None:
        return plain(line)
    if type(error).__name__ == "SafetensorError":  # safetensors' Rust error type, not importable by a stable name
        first = _first_line(error)
        found = checkpoint_dirs(resume_dir) if resume_dir is not None else []
        if found:
            return (
                f"checkpoint {found[-1]} is damaged (a safetensors file in it: {first}); move it out of "
                f"{found[-1].parent} to resume from the one before"
            )
        return f"a safetensors file is damaged or truncated ({first}); write it again or use an intact copy"
    if _damaged_shard(error):  # passed the up-front check (trainer.data.sources.shardcheck), broken since
        first = _first_line(error)
        run_dir = resume_dir or joined_run_dir()
        resume = f"trainer train --resume {run_dir}" if run_dir else "the command again"
        return (
            f"a data shard could not be read mid-run ({type(error).__name__}: {first}); it passed the check at the "
            f"start, so it changed or its disk failed since: restore it, then run {resume}"
        )
    if lost_peer(error):  # a rank died or stopped answering: the survivors say so (trainer.run.peers)
        return lost_peer_line(error, resume_dir or joined_run_dir())
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or ["damaged"])[0]


def _damaged_shard(error: BaseException) -> bool:
    """A WebDataset tar or a Parquet/Arrow file that fails while it is read: tarfile's ReadError, pyarrow's
    ArrowInvalid (by name: pyarrow is not imported here), and the errno-less OSError pyarrow raises for a Parquet
    file it cannot parse."""
    import tarfile

    if isinstance(error, tarfile.ReadError):
        return True
    if type(error).__name__ == "ArrowInvalid" and type(error).__module__.startswith("pyarrow"):
        return True
    return type(error) is OSError and error.errno is None and "Parquet" in str(error)


def leave_process_group() -> None:
    """Before exiting on an error every rank met alike (a refusal they agreed on): tear the gloo/NCCL group down here,
    in order, rather than in the interpreter's exit, where gloo was seen to abort a rank (SIGABRT) and the
    launcher then reports signals instead of the exit code 2 every rank chose."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # leaving is best effort: the error line is already out
            dist.destroy_process_group()
