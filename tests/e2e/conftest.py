"""Helpers for end-to-end runs of the real CLI, in fresh processes, as users launch it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"


def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/e2e `e2e`, so `pytest -m "not e2e"` leaves out the long runs."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The user's environment minus anything that would change a run: no wandb key, an empty HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "HF_"))}
    env.pop("MASTER_ADDR", None)
    env.pop("WORLD_SIZE", None)
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(cwd / "home", **env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def accelerate_launch(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "trainer", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun ... -m trainer ARGS`."""
    return torchrun_script(nproc, "-m", "trainer", *args)


def torchrun_script(nproc: int, *target: str) -> list[str]:
    """`torchrun ... TARGET`: a script and its arguments, or `-m module ...`."""
    # --standalone picks a free rendezvous port, so leftover or parallel runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]


def results(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def config_of(run_dir: Path) -> dict:
    with open(run_dir / "config.yaml") as f:
        return yaml.safe_load(f)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path
