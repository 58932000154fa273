"""A lost peer -> one line: which rank this is, which one it lost, how long it waited, where, and how to continue.

When a rank of a multi-process run dies (kill -9, an OOM kill, a node gone) or stops answering (SIGSTOP, a hung
device), the others fail in their next collective: gloo raises a plain RuntimeError ("Connection reset by peer",
"Timed out waiting 6000ms for recv operation to complete"), NCCL and the c10d store raise torch.distributed's
DistBackendError / DistNetworkError. `lost_peer` recognises them (by type first, text second); `lost_peer_line` says
what happened. Light: no torch import (its types are looked up only when torch.distributed is already loaded)."""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from pathlib import Path

from trainer.run.layout import checkpoint_dirs

# The words of gloo, NCCL and the c10d store for a peer whose connection closed, and for one that stopped answering.
_CLOSED = re.compile(
    r"Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused|failed to recv, got 0 bytes"
    r"|remote process exit|ncclRemoteError"
)
# gloo closes a pair once one wait on it timed out: the next call on it says "Application timeout caused pair closure".
_TIMED_OUT = re.compile(
    r"Timed out waiting (\d+) ?ms|timed out after (\d+) ?ms|Timeout\(ms\)=(\d+)|Socket Timeout|timed out"
    r"|timeout caused pair closure",
    re.I,
)
# Plain RuntimeErrors count only when they come from a distributed backend, not from any library that says "timed out"
# (gloo's messages start with their source path: "[.../third_party/gloo/gloo/transport/tcp/pair.cc:561] ...").
_BACKEND = re.compile(r"gloo|nccl|NCCL|c10d|TCPStore|ProcessGroup|caused pair closure")
_ADDRESS = re.compile(r"\[([0-9A-Za-z.:-]+)\]:(\d+)")  # gloo: "Read error [127.0.0.1]:17794"
# Words in the names of torch's Python frames that wait on peers (DDP's buffer broadcast in forward is
# `_default_broadcast_coalesced`; its gradient all-reduce runs in C++ during backward, without a frame of its own).
_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "all_to_all", "reduce", "gather")
_PACKAGE = Path(__file__).resolve().parents[1]  # trainer/: frames anywhere in the package are ours


def _dist_error_type() -> type | None:
    dist = sys.modules.get("torch.distributed")
    return getattr(dist, "DistError", None) if dist is not None else None


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a rank's collective failing because a peer died or stopped answering."""
    dist_error = _dist_error_type()
    if dist_error is not None and isinstance(error, dist_error):
        return True
    if type(error) is not RuntimeError:
        return False
    text = str(error)
    return bool(_BACKEND.search(text) and (_CLOSED.search(text) or _TIMED_OUT.search(text)))


def ignore_sigterm() -> None:
    """Ignore SIGTERM for the rest of this process, which a lost peer is ending. torchrun and accelerate launch
    SIGTERM the survivors within 0.1 s of a rank's death: a rank killed then, or during Python's slow exit (which
    puts the default action back for signals it handled, not for ignored ones), would say nothing and end by the
    signal instead of its one line and exit 2. Ignored, not blocked: a blocked signal still kills through any other
    thread (gloo's, the loaders'). Should the exit hang, the launcher's SIGKILL follows (30 s later)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def lost_peer_line(error: BaseException, run_dir: Path | None) -> str:
    """The one line for a lost peer on this rank; `run_dir`: the run folder every rank agreed on, if any yet."""
    text = " ".join((str(error).strip().splitlines() or [""])[0].split())  # C++ frames follow on later lines
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    address = _ADDRESS.search(text)
    if world == "2" and rank in ("0", "1"):
        peer = f"rank {1 - int(rank)}"
    else:
        peer = f"a peer at {address.group(1)}:{address.group(2)}" if address else "a peer"
    timed_out = _TIMED_OUT.search(text)
    if _CLOSED.search(text):
        what = "its connection closed"
    elif timed_out:
        waited_s = next((int(g) / 1000 for g in timed_out.groups() if g), None) or _group_timeout_s()
        waited = f" within {waited_s:g} s" if waited_s is not None else ""
        what = f"it stopped answering, no reply{waited} (--dist-timeout sets the wait)"
    else:  # a DistError in other words
        what = "a collective failed"
    said = f"{type(error).__name__}: {_first_words(text)}"
    elastic = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun, accelerate launch: it prints a summary
    launched = "; the launcher's summary names the rank that failed first" if elastic else ""
    return f"rank {rank} of {world} lost {peer}{_where(error)}: {what} ({said}){launched}; {_next_step(run_dir)}"


def _group_timeout_s() -> float | None:
    """The default process group's timeout (--dist-timeout, or PyTorch's default), for a message that does not say
    how long it waited. Best effort: torch keeps it in its backends' options (not a public API)."""
    dist = sys.modules.get("torch.distributed")
    try:
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(next(iter(group._device_types)))
        return backend.options._timeout.total_seconds()
    except Exception:  # no group, or torch keeps it elsewhere: the line goes without the figure
        return None


def _first_words(text: str) -> str:
    """The library's message without its source path prefix ("[/.../gloo/.../pair.cc:545] Read error ...")."""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0]  # gloo's standard advice, longer than the news
    return text[:200]


def _where(error: BaseException) -> str:
    """Where the rank was, as far as the traceback tells: the last completed step (the loop's `state`), the innermost
    trainer frame and the collective it waited in; e.g. ` after step 12, in `accelerator.backward(loss)`
    (trainer/train/loop.py:160, waiting in the gradient all-reduce)`."""
    frames = list(traceback.walk_tb(error.__traceback__))
    ours = [i for i, (f, _) in enumerate(frames) if Path(f.f_code.co_filename).resolve().is_relative_to(_PACKAGE)]
    if not ours:
        return ""
    frame, lineno = frames[ours[-1]]
    summary = traceback.FrameSummary(frame.f_code.co_filename, lineno, frame.f_code.co_name)
    call = (summary.line or frame.f_code.co_name).strip()
    inner = [f.f_code.co_name for f, _ in frames[ours[-1] + 1 :]]
    waits = (word for name in reversed(inner) for word in _COLLECTIVES if word in name)
    collective = next(waits, "the gradient all-reduce" if "backward" in call else None)
    place = f"{Path(summary.filename).resolve().relative_to(_PACKAGE.parent)}:{lineno}"
    waiting = f", waiting in {collective}" if collective else ""
    return f"{_last_step([frames[i][0] for i in ours])}, in `{call}` ({place}{waiting})"


def _last_step(frames: list) -> str:
    """` after step 12`: the optimizer steps the loop had completed (its `state.step`, innermost frame first)."""
    for frame in reversed(frames):
        step = getattr(frame.f_locals.get("state"), "step", None)
        if isinstance(step, int):
            return f" after step {step}"
    return ""


def _next_step(run_dir: Path | None) -> str:
    found = checkpoint_dirs(run_dir) if run_dir is not None else []
    if not found:
        return "no checkpoint was saved yet: start the command again"
    return f"the newest checkpoint {found[-1]} is kept; continue with: trainer train --resume {run_dir}"
