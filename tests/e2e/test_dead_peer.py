"""A peer that stops answering (SIGSTOP) or dies (SIGKILL) in a 2-rank run (issue 19, case 11): each surviving rank
says what happened in one line and exits 2, without a traceback; the checkpoints are kept and --resume finishes."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from conftest import check, config_of, results, run, torchrun
from safetensors.torch import load_file
from test_resume import rank_pid, start, steps

# 1,617 training digits / 64 = 25 steps in the one epoch, a checkpoint every 4.
ARGS = ("--data", "digits", "--imgsz", "16", "--epochs", "1", "--batch-size", "64", "--checkpoint-every", "4")
ARGS += ("--model", "test_resnet", "--tracker", "none", "--workers", "0")


def logged(launch: list[str], log_dir: Path) -> list[str]:
    """torchrun writing each rank's stdout and stderr to files under `log_dir` (its own summary stays on stderr)."""
    return [*launch[:3], "--log-dir", str(log_dir), "--redirects", "3", *launch[3:]]


def rank_stderr(log_dir: Path, rank: int) -> str:
    (path,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text()


def said(stderr: str) -> str:
    """The rank's one `trainer: error:` line; no traceback of ours."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("trainer: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_for(condition, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)


def test_a_stopped_then_a_killed_peer_get_one_line_each_and_resume_finishes(workdir: Path):
    run_dir = workdir / "runs" / "train" / "cut"
    relative = Path("runs") / "train" / "cut"
    # 1. Rank 1 stopped (SIGSTOP) after the step-4 checkpoint: rank 0 waits --dist-timeout (0.1 min), then says so.
    #    Continued once rank 0 has ended, rank 1 says what it saw too.
    logs = workdir / "logs1"
    launch = logged(torchrun(2, "train", *ARGS, "--name", "cut", "--dist-timeout", "0.1"), logs)
    proc = start(launch, workdir)
    wait_for(lambda: 4 in steps(run_dir), proc)
    rank0, rank1 = rank_pid(proc, 0), rank_pid(proc, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.time()
    wait_for(lambda: ended(rank0), proc)
    waited = time.time() - stopped
    os.kill(rank1, signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-3000:]
    assert "exitcode  : 2 (pid" in out, out[-3000:]  # rank 0's own exit code, in torchrun's summary
    line = said(rank_stderr(logs, 0))
    assert line.startswith("trainer: error: rank 0 of 2 lost rank 1 after step "), line
    assert "it stopped answering, no reply within 6 s" in line and "--dist-timeout" in line, line
    assert 6 <= waited < 60, waited
    newest = steps(run_dir)[-1]
    assert f"checkpoint {relative}/checkpoints/step-{newest} is kept" in line, line
    assert line.endswith(f"continue with: trainer train --resume {relative}"), line
    # Rank 1 does not hold the run folder, but knows it. Its own wait ran out while it was stopped, or it finds rank
    # 0's connection closed.
    line = said(rank_stderr(logs, 1))
    assert line.startswith("trainer: error: rank 1 of 2 lost rank 0 after step "), line
    assert line.endswith(f"continue with: trainer train --resume {relative}"), line

    # 2. Resumed, then rank 1 killed (SIGKILL) after the next checkpoint: rank 0 says so at once.
    logs = workdir / "logs2"
    proc = start(logged(torchrun(2, "train", "--resume", str(relative)), logs), workdir)
    wait_for(lambda: steps(run_dir)[-1] > newest, proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    killed = time.time()
    out = proc.communicate(timeout=120)[0]
    assert time.time() - killed < 30, out[-3000:]  # not a timeout: the connection closed
    assert "exitcode  : 2 (pid" in out and "exitcode  : -9 (pid" in out, out[-3000:]
    resumed = next(logs.glob("*/attempt_0/0/stdout.log")).read_text()
    assert f"resuming {relative} at epoch 1, step {newest}" in resumed, resumed[-2000:]  # the kept checkpoint loads
    line = said(rank_stderr(logs, 0))
    # Where it waited: the step, the call in trainer's code, its place (and the collective, when torch names it).
    where = r"trainer: error: rank 0 of 2 lost rank 1 after step \d+, in `.+` \(trainer/[\w/]+\.py:\d+"
    assert re.match(where, line), line
    assert "its connection closed" in line and "the launcher's summary names the rank that failed" in line, line
    newest = steps(run_dir)[-1]
    assert f"checkpoint {relative}/checkpoints/step-{newest} is kept" in line, line

    # 3. Nothing lost: the newest checkpoint resumes, and the run finishes on 2 ranks.
    proc = check(run(torchrun(2, "train", "--resume", str(relative)), workdir))
    assert f"resuming {relative} at epoch 1, step {newest}" in proc.stdout, proc.stdout[-2000:]
    assert config_of(run_dir)["launch"]["num_processes"] == 2
    assert [row["epoch"] for row in results(run_dir)] == ["1"]
    assert load_file(str(run_dir / "weights" / "last.safetensors"))
