"""Kill a real run (SIGKILL at a few steps, once during a save; SIGTERM), resume it, and get the weights of the
uninterrupted run bit for bit: 1 process (resumed with --workers 2 once) and 2 gloo ranks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from conftest import check, clean_env, config_of, run, torchrun, trainer
from safetensors.torch import load_file

# Tiny and exactly repeatable: 1,617 training digits / 64 = 25 optimizer steps per epoch, a checkpoint every 5.
# timm's test_resnet (a ResNet with BatchNorm, 0.4M parameters) halves the cost of each run against resnet10t.
ARGS = ("--data", "digits", "--imgsz", "16", "--epochs", "2", "--batch-size", "64", "--deterministic", "--seed", "3")
ARGS += ("--model", "test_resnet", "--tracker", "none", "--checkpoint-every", "5", "--workers", "0")


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=clean_env(cwd / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def children(pid: int) -> dict[int, bytes]:
    """Child pids of `pid` with their environment (torchrun starts its ranks in sessions of their own)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        found.extend(kids := list(children(todo.pop())))
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[-1]) for p in root.glob("step-*")) if root.is_dir() else []


def saving(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in os.scandir(root))


def kill_when(proc: subprocess.Popen, ready, sig: int = signal.SIGKILL, timeout: float = 600) -> str:
    """Send `sig` to the whole launch as soon as `ready()` holds, as when a node goes away; return the output."""
    deadline, tree, scanned = time.time() + timeout, [], 0.0
    while not ready():
        assert proc.poll() is None, f"finished before the kill point:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "kill point never reached"
        if time.time() - scanned > 0.5:  # scanning /proc takes a while: keep it out of the moment of the kill
            tree, scanned = descendants(proc.pid), time.time()
        time.sleep(0.001)
    os.killpg(proc.pid, sig)  # the trainer (or launcher) and its DataLoader workers at once
    for pid in tree:  # torchrun starts its ranks in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGKILL:  # nothing may go on writing checkpoints behind the next run's back
        while any(_alive(pid) for pid in tree):
            assert time.time() < deadline + 60, "a killed process lives on"
            time.sleep(0.05)
    return out


def assert_same_weights(a: Path, b: Path, name: str = "last.safetensors") -> None:
    wa, wb = load_file(str(a / "weights" / name)), load_file(str(b / "weights" / name))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_kill_anywhere_and_resume_is_bitwise_exact(workdir: Path):
    runs = workdir / "runs" / "train"
    check(run(trainer("train", *ARGS, "--name", "ref"), workdir))
    cut = runs / "cut"

    # 1. SIGKILL mid-epoch, after the step-10 checkpoint.
    kill_when(start(trainer("train", *ARGS, "--name", "cut"), workdir), lambda: 10 in steps(cut))
    # 2. Resumed with 2 workers (a harmless change): SIGKILL while a checkpoint is being written. A save can finish
    #    between noticing it and the kill; then the kill fell just after it, and we try at the next save.
    for _attempt in range(3):
        before = steps(cut)[-1]
        proc = start(trainer("train", "--resume", str(cut), "--workers", "2"), workdir)
        out = kill_when(proc, lambda b=before: saving(cut) and steps(cut)[-1] == b)
        assert f"resuming {cut}" in out
        if saving(cut):  # killed inside the save: the torn folder is ignored, the previous checkpoint intact
            break
    else:
        raise AssertionError("never killed during a save")
    assert len(steps(cut)) == 2  # --keep-checkpoints 2
    # 3. SIGTERM to every process, DataLoader workers included: the current step finishes, a checkpoint is saved,
    #    exit 128 + 15.
    before = steps(cut)[-1]
    proc = start(trainer("train", "--resume", "--project", str(runs), "--name", "cut", "--workers", "2"), workdir)
    out = kill_when(proc, lambda: steps(cut)[-1] > before, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and f"--resume {cut}" in out
    assert steps(cut)[-1] % 5 != 0 or steps(cut)[-1] % 25 == 0, steps(cut)  # saved on the signal, not on schedule
    assert not saving(cut)
    # 4. Resume to the end.
    check(run(trainer("train", "--resume", str(cut)), workdir))

    assert_same_weights(runs / "ref", cut)
    assert (cut / "results.csv").read_text() == (runs / "ref" / "results.csv").read_text()


def rank_pid(launcher: subprocess.Popen, local_rank: int) -> int:
    """The pid of one rank under torchrun."""
    for pid, env in children(launcher.pid).items():
        if f"LOCAL_RANK={local_rank}".encode() in env.split(b"\0"):
            return pid
    raise AssertionError(f"no rank {local_rank} under {launcher.pid}")


def test_two_ranks_killed_and_resumed_is_bitwise_exact(workdir: Path):
    """With the stateful extras on: the weight EMA (a registered checkpoint object) and mixup/cutmix draws."""
    runs = workdir / "runs" / "train"
    args = (*ARGS, "--ema", "--ema-decay", "0.9", "--mixup", "0.2", "--cutmix", "1.0")
    check(run(torchrun(2, "train", *args, "--name", "ref"), workdir))
    assert config_of(runs / "ref")["launch"]["num_processes"] == 2
    cut = runs / "cut"
    kill_when(start(torchrun(2, "train", *args, "--name", "cut"), workdir), lambda: 10 in steps(cut))
    # SIGTERM reaching one rank only: both agree on the step, save, and stop.
    proc = start(torchrun(2, "train", "--resume", str(cut)), workdir)
    deadline = time.time() + 600
    while 15 not in steps(cut):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    os.kill(rank_pid(proc, 1), signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "stopped by SIGTERM" in out, out[-3000:]
    stopped_at = steps(cut)[-1]
    assert stopped_at > 15 and sorted(
        p.name for p in (cut / "checkpoints" / f"step-{stopped_at}").glob("trainer_state_*.json")
    ) == [
        "trainer_state_0.json",
        "trainer_state_1.json",
    ]
    check(run(torchrun(2, "train", "--resume", str(cut)), workdir))
    assert_same_weights(runs / "ref", cut)
    assert_same_weights(runs / "ref", cut, "best.safetensors")  # the better of model and EMA, EMA state resumed
    assert (cut / "results.csv").read_text() == (runs / "ref" / "results.csv").read_text()
    assert "val/top1_ema" in (cut / "results.csv").read_text().splitlines()[0]
