"""Scale out on one machine: the shipped SLURM script starting two "nodes" on loopback, and torchrun restarting a
killed rank that then resumes by itself. Both end with the weights of a plain 2-rank run, bit for bit."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, check, clean_env, config_of, results, run, torchrun
from test_resume import ARGS, assert_same_weights, descendants, rank_pid, steps
from wandb_file import read_run

SBATCH = ROOT / "accelerate_configs" / "slurm.sbatch"
WANDB = ("--tracker", "wandb")  # overrides ARGS' --tracker none: one wandb run (offline) is part of the claim

# Stand-ins for SLURM's commands: `scontrol show hostnames` names every node 127.0.0.1, `srun` starts its command
# once per node with that node's SLURM_NODEID, as slurmstepd does on real nodes. Node 0 goes first, until its
# rendezvous store listens: here every node could host it (127.0.0.1 is each one's own address), and accelerate
# refuses to start machine 0 on a port already taken; on real machines only the first node binds that port.
FAKE_SRUN = """#!{python}
import os, socket, subprocess, sys, time
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
def task(node):
    return subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node)}})
tasks = [task(0)]
while socket.socket().connect_ex(("127.0.0.1", int(os.environ["MAIN_PORT"]))) and tasks[0].poll() is None:
    time.sleep(0.1)
tasks += [task(node) for node in range(1, int(os.environ["SLURM_NNODES"]))]
sys.exit(max(t.wait() for t in tasks))
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run both tests must reproduce: 2 ranks on one machine, never interrupted."""
    cwd = tmp_path_factory.mktemp("reference")
    (cwd / "home").mkdir()
    proc = check(run(torchrun(2, "train", *ARGS, "--name", "ref"), cwd))
    assert "2 process(es)" in proc.stdout
    return cwd / "runs" / "train" / "ref"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=clean_env(cwd / "home", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The launch's output once it ends; one that hangs is killed with every process it started (a waiting
    launcher would otherwise join the next test's rendezvous)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{proc.communicate()[0][-3000:]}") from None


def test_slurm_script_on_two_loopback_nodes(reference: Path, workdir: Path):
    """slurm.sbatch as submitted: two launchers of one process each, joined by c10d into one run of world size 2."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1"}
    proc = start(
        ["bash", str(SBATCH), *ARGS, *WANDB],
        workdir,
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        LAUNCH_CONFIG=str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),  # MULTI_GPU on CPU: gloo ranks
        MAIN_PORT=str(free_port()),
        MAX_RESTARTS="0",
        # torchrun gives each of the reference's 2 local ranks one OpenMP thread; a launcher of one process per node
        # leaves torch its default (here 2), and another thread count sums floats in another order: not bitwise.
        OMP_NUM_THREADS="1",
        **slurm,
    )
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    runs = workdir / "runs" / "train"
    assert [p.name for p in runs.iterdir()] == ["job42"]  # one run folder, named after the job
    run_dir = runs / "job42"
    assert config_of(run_dir)["launch"]["num_processes"] == 2
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    wandb_run = read_run(next(offline[0].glob("run-*.wandb")))
    assert len(wandb_run.runs) == 1 and wandb_run.config["launch.num_processes"] == 2
    assert_same_weights(reference, run_dir)
    assert (run_dir / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_torchrun_restart_resumes_by_itself(reference: Path, workdir: Path):
    """SIGKILL one rank mid-epoch: torchrun restarts both, and the same command line continues the run."""
    runs = workdir / "runs" / "train"
    cut = runs / "cut"
    launch = torchrun(2, "train", *ARGS, *WANDB, "--name", "cut", "--resume", "auto", "--dist-timeout", "2")
    at = launch.index("--standalone") + 1
    launch[at:at] = ["--max-restarts", "2"]
    # See docs/distributed.md (Several machines): without it torch 2.14's restarted ranks may read old addresses.
    proc = start(launch, workdir, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    deadline = time.time() + 600
    while 10 not in steps(cut):  # a mid-epoch checkpoint (25 steps per epoch)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(rf"resuming {cut.relative_to(workdir)} at epoch 1, step (10|15)\b", out), out[-3000:]
    assert [p.name for p in runs.iterdir()] == ["cut"]  # started and continued in one folder, no cut2

    run_id = (cut / "wandb_id.txt").read_text().strip()
    sessions = list((cut / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions)  # one wandb run
    assert [row["epoch"] for row in results(cut)] == ["1", "2"]
    assert_same_weights(reference, cut)
    assert (cut / "results.csv").read_text() == (reference / "results.csv").read_text()
