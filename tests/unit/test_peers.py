"""A lost peer's one line (trainer.run.peers through faults.error_line), on the errors torch really raises: gloo's, from
two real gloo process groups in this process (one per thread), and torch.distributed's own types with NCCL's and the
c10d store's words. tests/e2e/test_dead_peer.py kills and stops real ranks."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator

from trainer.config import CheckpointConfig
from trainer.run.checkpointer import Checkpointer
from trainer.run.faults import error_line
from trainer.run.peers import lost_peer


def gloo_pair(timeout_ms: int) -> list:
    """Ranks 0 and 1 of one real gloo group, made at once (each waits for the other) on a shared in-memory store."""
    store, groups = dist.HashStore(), [None, None]

    def join(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, timedelta(milliseconds=timeout_ms))

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return groups


def raised(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.fixture
def rank_0_of_2(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)


def a_run_with_checkpoints(root: Path) -> Path:
    run_dir = root / "runs" / "train" / "exp"
    for step in (5, 10):
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
    return run_dir


def test_a_stopped_peer_gloo_timeout(tmp_path, rank_0_of_2):
    groups = gloo_pair(timeout_ms=200)
    error = raised(lambda: groups[0].allreduce([torch.ones(1)]).wait())  # rank 1 never joins: it stopped answering
    run_dir = a_run_with_checkpoints(tmp_path)
    assert type(error) is RuntimeError and lost_peer(error)
    assert error_line(error, run_dir) == (
        "rank 0 of 2 lost rank 1: it stopped answering, no reply within 0.2 s (--dist-timeout sets the wait) "
        "(RuntimeError: Timed out waiting 200ms for recv operation to complete); the newest checkpoint "
        f"{run_dir}/checkpoints/step-10 is kept; continue with: trainer train --resume {run_dir}"
    )
    # The next call on the timed-out pair says less; still a stopped peer (no default group here to read the wait of).
    error = raised(lambda: groups[0].allreduce([torch.ones(1)]).wait())
    assert error_line(error, run_dir).startswith(
        "rank 0 of 2 lost rank 1: it stopped answering, no reply (--dist-timeout sets the wait) "
        "(RuntimeError: Application timeout caused pair closure); the newest checkpoint"
    )


def test_a_dead_peer_gloo_connection_closed_among_four(monkeypatch):
    groups = gloo_pair(timeout_ms=5000)
    groups.pop(1)  # rank 1's group is destroyed: its sockets close, as when its process dies
    error = raised(lambda: groups[0].allreduce([torch.ones(1)]).wait())
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    line = error_line(error, None)
    assert line.startswith("rank 2 of 4 lost a peer at 127.0.0.1:"), line  # more than 2 ranks: gloo's address
    assert ": its connection closed (RuntimeError: Connection closed by peer [127.0.0.1]:" in line, line
    assert "GLHF" not in line and "typically caused" not in line  # gloo's boilerplate left out
    launcher = "the launcher's summary names the rank that failed first"
    assert line.endswith(f"; {launcher}; no checkpoint was saved yet: start the command again"), line


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            dist.DistBackendError(
                "[PG ID 0 PG GUID 0(default_pg) Rank 0] Process group watchdog thread terminated with exception: "
                "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, "
                "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600018 milliseconds before timing out."
            ),
            "it stopped answering, no reply within 600 s",
        ),
        (
            dist.DistBackendError(
                "NCCL error in: ProcessGroupNCCL.cpp:3356, remote process exited or there was a network error, NCCL "
                "version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote process "
                "exiting prematurely."
            ),
            "its connection closed",
        ),
        (
            dist.DistNetworkError(
                "The client socket has timed out after 1000ms while trying to connect to (127.0.0.1, 29500).\n"
                "Exception raised from throwTimeoutError at socket.cpp:1030 (most recent call first):\nframe #0: ..."
            ),
            "it stopped answering, no reply within 1 s",
        ),
        (dist.DistError("unhandled system error"), "a collective failed (DistError: unhandled system error)"),
    ],
)
def test_torch_distributed_error_types(error, said, rank_0_of_2):
    line = error_line(error, None)
    assert line.startswith(f"rank 0 of 2 lost rank 1: {said}"), line
    assert "frame #0" not in line  # C++ frames on later lines stay out


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: the launch timed out and was terminated"),  # no distributed backend's words
        RuntimeError("Connection reset by peer"),
        ValueError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection reset by peer"),  # not its type
    ],
)
def test_other_errors_are_not_lost_peers(error):
    assert not lost_peer(error)
    assert error_line(error) is None  # a bug: the traceback is shown


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_lost_peer_leaves_the_launchers_sigterm_ignored(tmp_path):
    """The launcher SIGTERMs the survivors at once; ignored, it cannot cut a rank off before its line and exit 2."""
    groups = gloo_pair(timeout_ms=100)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError), Checkpointer(Accelerator(cpu=True), tmp_path, CheckpointConfig()):
            groups[0].allreduce([torch.ones(1)]).wait()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, previous)
        with pytest.raises(KeyError), Checkpointer(Accelerator(cpu=True), tmp_path, CheckpointConfig()):
            raise KeyError("a bug")
        assert signal.getsignal(signal.SIGTERM) is previous  # any other error: the handler as before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_where_a_rank_waited_is_found_in_any_sub_package():
    """The place in the lost-peer line comes from the innermost frame inside trainer/, sub-packages included (the
    package root, not the folder of peers.py: trainer/train/loop.py is where ranks wait)."""
    import trainer
    from trainer.run.peers import _where

    loop_file = Path(trainer.__file__).parent / "train" / "loop.py"
    namespace: dict = {}
    source = "def step(state):\n    raise RuntimeError('Connection reset by peer')\n"
    exec(compile(source, str(loop_file), "exec"), namespace)

    class State:
        step = 7

    with pytest.raises(RuntimeError) as caught:
        namespace["step"](State())
    where = _where(caught.value)
    assert where.startswith(" after step 7, in `"), where
    assert "(trainer/train/loop.py:2" in where, where
